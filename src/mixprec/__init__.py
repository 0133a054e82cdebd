"""mixprec: mixed-precision quantization and inference for PyTorch models."""

from mixprec.batchnorm import fold_batchnorm
from mixprec.errors import (
    CalibrationError,
    CheckpointError,
    DataError,
    ExportError,
    InputError,
    MixprecError,
    PolicyError,
)
from mixprec.export import export
from mixprec.nn.native_decoder import NativeLlamaDecoder
from mixprec.nn.packed_encoder import PackedEncoder
from mixprec.policy import Policy, Rule
from mixprec.qat import FakeQuantLinear, prepare_qat
from mixprec.quant_report import LayerReport, QuantReport
from mixprec.quantize import quantize
from mixprec.serialization import load, save

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "CheckpointError",
    "DataError",
    "ExportError",
    "FakeQuantLinear",
    "InputError",
    "LayerReport",
    "MixprecError",
    "NativeLlamaDecoder",
    "PackedEncoder",
    "Policy",
    "PolicyError",
    "QuantReport",
    "Rule",
    "export",
    "fold_batchnorm",
    "load",
    "prepare_qat",
    "quantize",
    "save",
]
