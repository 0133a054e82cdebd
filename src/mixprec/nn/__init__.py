"""Quantized modules that own their packed storage and pick a kernel."""

from mixprec.nn.base import QuantizedModule
from mixprec.nn.conv import HalfConv, Int8Conv, Int8StaticConv, QuantizedConv, W4Conv, W8Conv
from mixprec.nn.embedding import HalfEmbedding, Int8Embedding, W4Embedding, W8GroupEmbedding
from mixprec.nn.linear_half import HalfLinear
from mixprec.nn.linear_int8 import (
    Int8AsymLinear,
    Int8AsymPackedLinear,
    Int8DynamicLinear,
    Int8PackedLinear,
    Int8StaticLinear,
    Int8StaticPackedLinear,
    Int8TensorFakeQuantLinear,
    W8Linear,
    int8_asym_class,
    int8_dynamic_class,
    int8_static_class,
)
from mixprec.nn.linear_weight_only import W4A8Linear, W4Linear, W8GroupLinear

__all__ = [
    "HalfConv",
    "Int8Conv",
    "Int8StaticConv",
    "QuantizedConv",
    "W4Conv",
    "W8Conv",
    "HalfEmbedding",
    "HalfLinear",
    "Int8DynamicLinear",
    "Int8Embedding",
    "Int8PackedLinear",
    "Int8AsymLinear",
    "Int8AsymPackedLinear",
    "Int8StaticLinear",
    "Int8StaticPackedLinear",
    "Int8TensorFakeQuantLinear",
    "QuantizedModule",
    "W4A8Linear",
    "W4Embedding",
    "W4Linear",
    "W8GroupEmbedding",
    "W8GroupLinear",
    "W8Linear",
    "int8_asym_class",
    "int8_dynamic_class",
    "int8_static_class",
]
