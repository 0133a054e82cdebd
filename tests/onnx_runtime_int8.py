"""Where ONNX Runtime's own int8 arithmetic is exact, and a marker for the tests that compare it bit for bit."""

from __future__ import annotations

import pytest

from mixprec.bench.peers import onnxruntime_reduce_range

#: On x86 without VNNI ONNX Runtime multiplies uint8 x int8 with ``vpmaddubsw``, which adds pairs of products in
#: int16 with saturation (the reason its quantization documentation advises 7-bit weights there): its int8 GEMMs and
#: convolutions are then not the exact int32 sums mixprec computes. Measured on an AVX2 CPU: the tiny BERT's int8
#: layers 0.011-0.014 from mixprec's (2e-6 with VNNI), an int8 MLP 0.062, ResNet-8 0.020.
INT8_INEXACT = onnxruntime_reduce_range()

needs_exact_int8 = pytest.mark.skipif(INT8_INEXACT, reason="ONNX Runtime's uint8 x int8 kernels saturate int16 "
                                                           "pair sums on x86 without VNNI")
