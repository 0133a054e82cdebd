"""The .tflite flatbuffer: writing a graph out and loading files TensorFlow's converter made."""
