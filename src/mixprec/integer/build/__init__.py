"""Builders of integer graphs from float PyTorch modules plus calibration data."""
