"""Fused C++ kernels, compiled on first use with PyTorch's extension builder.

The build uses ``-O3 -march=native -ffp-contract=off -fopenmp`` and no fast-math flags,
so results equal the PyTorch reference path bit for bit. OpenMP: the GEMM-like kernels
split their output rows over PyTorch's own OpenMP threads (``csrc/split_rows.h``); the
memory-bound quantize and rescale loops stay on the calling thread, which measured faster
here. If the build fails (no compiler, no headers), links its own copy of the C++ standard
library (which crashes beside PyTorch's), or ``MIXPREC_NATIVE=0`` is set,
:func:`available` is False, mixprec warns once with the reason, and the int8 layers run
their PyTorch path, recording that kernel name.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("int8_rows.cpp", "int4_weights.cpp", "kv_dequant.cpp", "kv_attention.cpp", "kws_pipeline.cpp",
                         "w4a8_gemm.cpp", "tflite_conv.cpp", "tflite_reduce.cpp",
                         "tflite_requantize.cpp", "tflite_fully_connected.cpp", "tflite_add.cpp",
                         "tflite_program.cpp", "int8_packed_rows.cpp", "int8_dense_rows.cpp", "kv_cache_store.cpp",
                         "llama_decode.cpp")]
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]


def _headers_flag() -> str:
    """A define naming the digest of csrc/*.h: PyTorch's builder hashes the sources and flags, not the
    headers they include, so an edited header changes the flags and triggers a rebuild."""
    digest = hashlib.sha256()
    for header in sorted(_SOURCES[0].parent.glob("*.h")):
        digest.update(header.name.encode() + header.read_bytes())
    return f"-DMIXPREC_HEADERS_DIGEST={digest.hexdigest()[:16]}"


#: The built extension as a Python module (its operators are under ``torch.ops.mixprec``), once loaded.
_module = None


@functools.lru_cache(maxsize=1)
def load_error() -> str | None:
    """None if the native kernels are loaded, else why they are not."""
    if os.environ.get("MIXPREC_NATIVE", "1") == "0":
        return "disabled by MIXPREC_NATIVE=0"
    try:
        import ninja  # the pip package: make its binary visible to PyTorch's builder
        from torch.utils.cpp_extension import load

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        started = time.perf_counter()
        building = not _built_before()
        if building:
            print("mixprec: compiling the native kernels (first use only, about a minute on 2 cores)...",
                  file=sys.stderr, flush=True)
        global _module
        _module = load(name="mixprec_native", sources=[str(path) for path in _SOURCES],
                       extra_cflags=[*_FLAGS, _headers_flag()], is_python_module=True, verbose=False)
        if building:
            print(f"mixprec: native kernels built in {time.perf_counter() - started:.0f} s", file=sys.stderr,
                  flush=True)
        own_library = own_cxx_library_reason(Path(_module.__file__))
        if own_library:
            _module = None
            raise RuntimeError(own_library)
        from mixprec.kernels import fake_ops  # shapes for torch.compile's tracing

        fake_ops.register()
    except Exception as exc:  # any build or load failure means: use the PyTorch path
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        warnings.warn(f"mixprec: native int8 kernels unavailable ({reason}); "
                      "int8 layers use the slower PyTorch path", RuntimeWarning, stacklevel=2)
        return reason
    return None


def own_cxx_library_reason(extension: Path) -> str | None:
    """Why the built ``extension`` must not be used, if it carries its own copy of the C++ standard
    library (see :mod:`mixprec.kernels.shared_object`); None when it links ``libstdc++.so``."""
    from mixprec.kernels.shared_object import own_cxx_library

    if not own_cxx_library(extension):
        return None
    compiler = os.environ.get("CXX", "c++")
    return (f"the build links its own copy of the C++ standard library (compiler {compiler}: no libstdc++.so among "
            f"{extension.name}'s dependencies), which crashes beside PyTorch's; set CXX to a g++ that links it "
            f"dynamically (e.g. CXX=g++) and delete {extension.parent} to rebuild")


def _built_before() -> bool:
    """Whether PyTorch's extension cache already holds a build of the kernels (then loading takes
    a moment; otherwise it compiles them)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory("mixprec_native", False)) / "mixprec_native.so").is_file()
    except Exception:  # a private helper: if it changes, just say nothing
        return True


@torch.compiler.assume_constant_result  # torch.compile: decided once while tracing, not traced into
def available() -> bool:
    """Whether the fused kernels can be called."""
    return load_error() is None


def quantize_rows_s8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-row symmetric int8 quantization (see csrc/int8_rows.cpp)."""
    return torch.ops.mixprec.quantize_rows_s8(x)


def quantize_rows_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows_s8` with codes shifted by +128 into uint8 (zero point 128)."""
    return torch.ops.mixprec.quantize_rows_u8(x)


def quantize_rows_static_s8(x: torch.Tensor, scale: float, zero_point: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-tensor static int8 quantization with NaN row flags (see csrc/int8_rows.cpp)."""
    return torch.ops.mixprec.quantize_rows_static_s8(x, scale, zero_point)


def quantize_rows_static_s8_t(x: torch.Tensor, scale: torch.Tensor,
                              zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows_static_s8` with the scale and zero point in one-element float32 / int32 tensors."""
    return torch.ops.mixprec.quantize_rows_static_s8_t(x, scale, zero_point)


def quantize_samples_u8(x: torch.Tensor, samples: int, scale: float, zero_point: int) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """Fused per-tensor uint8 quantization with NaN flags per sample (see csrc/int8_rows.cpp)."""
    return torch.ops.mixprec.quantize_samples_u8(x, samples, scale, zero_point)


def rescale_rows_cols(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """Fused ``acc * row_scale * col_scale + bias`` in float32 (see csrc/int8_rows.cpp)."""
    return torch.ops.mixprec.rescale_rows_cols(acc, row_scale, col_scale, bias)


def rescale_rows_cols_(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`rescale_rows_cols` written over a float32 ``acc`` (returned)."""
    torch.ops.mixprec.rescale_rows_cols_(acc, row_scale, col_scale, bias)
    return acc


def int8_linear_dynamic(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`quantize_rows_s8`, ``torch._int_mm`` and :func:`rescale_rows_cols` in one call."""
    return torch.ops.mixprec.int8_linear_dynamic(x, weight, weight_scale, bias)


def w8_linear_rows(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """Weight-only int8 linear for few rows (see csrc/int8_rows.cpp)."""
    return torch.ops.mixprec.w8_linear_rows(x, weight, scale, bias)


def w8g_linear_rows(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """``w8gN`` linear for few rows, fp16 group scales with N a multiple of 16 (see csrc/int8_rows.cpp)."""
    return torch.ops.mixprec.w8g_linear_rows(x, codes, scale, bias)


def w4_dequantize_rows(packed: torch.Tensor, scale: torch.Tensor, begin: int, out: torch.Tensor) -> None:
    """Write float32 rows ``[begin, begin + len(out))`` of an int4 weight into ``out`` (see csrc/int4_weights.cpp)."""
    torch.ops.mixprec.w4_dequantize_rows(packed, scale, begin, out)


def w4_linear_rows(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """Int4 weight-only linear for few rows (see csrc/int4_weights.cpp)."""
    return torch.ops.mixprec.w4_linear_rows(x, packed, scale, bias)


@torch.compiler.assume_constant_result
def int8_dense_rows_available() -> bool:
    """Whether the native build has the few-row kernel for dense int8 weights (AVX512-VNNI or AVX2; see
    csrc/int8_dense_rows.cpp)."""
    return available() and bool(torch.ops.mixprec.int8_dense_rows_available())


def int8_dense_rows(q: torch.Tensor, row_scale: torch.Tensor, weight: torch.Tensor, col_scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """The int8 linear's output for 1 to 4 rows of uint8 codes and a dense int8 weight, streamed once."""
    return torch.ops.mixprec.int8_dense_rows(q, row_scale, weight, col_scale, bias)


@torch.compiler.assume_constant_result
def int8_packed_rows_available() -> bool:
    """Whether the native build reads oneDNN's packed int8 weights in place for few rows (AVX512-VNNI; see
    csrc/int8_packed_rows.cpp)."""
    return available() and bool(torch.ops.mixprec.int8_packed_rows_available())


def int8_packed_layout_matches(weight: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether ``packed`` (oneDNN's pack of the int8 ``weight``) has the layout csrc/int8_packed_rows.cpp reads."""
    return bool(torch.ops.mixprec.int8_packed_layout_matches(weight, packed))


def int8_packed_rows(q: torch.Tensor, row_scale: torch.Tensor, packed: torch.Tensor, col_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """The int8 linear's output for 1 to 4 rows of uint8 codes, read from oneDNN's packed weight in place."""
    return torch.ops.mixprec.int8_packed_rows(q, row_scale, packed, col_scale, bias)


def w4a8_linear_blocked(xq: torch.Tensor, x_scale: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                        out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`w4a8_linear` on the blocked layout (see csrc/w4a8_gemm.cpp)."""
    return torch.ops.mixprec.w4a8_linear_blocked(xq, x_scale, codes, scale, out_features, bias)


def w4a8_linear_blocked_many(xq: torch.Tensor, x_scale: torch.Tensor, codes: list[torch.Tensor],
                             scales: list[torch.Tensor], out_features: list[int],
                             biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """:func:`w4a8_linear_blocked` of the same rows against several weights of one K and one group size, in one
    parallel region (their blocks split over the threads as one sequence); each output has the single call's bits."""
    return torch.ops.mixprec.w4a8_linear_blocked_many(xq, x_scale, codes, scales, out_features, biases)


@torch.compiler.assume_constant_result
def w4a8_available() -> bool:
    """Whether the native build has the AVX512-VNNI int4 x int8 kernel (see csrc/w4a8_gemm.cpp)."""
    return available() and bool(torch.ops.mixprec.w4a8_available())


@torch.compiler.assume_constant_result
def w4a8_blocked_available() -> bool:
    """Whether the native build runs w4a8's blocked layout: the AVX512-VNNI kernel, or without VNNI the AVX2 one
    (csrc/w4a8_gemm.cpp; the same bits)."""
    return available() and bool(torch.ops.mixprec.w4a8_blocked_available())


def w4a8_linear(xq: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """Int4 weights times per-row int8 activation codes ``xq`` with scales ``x_scale`` (see csrc/w4a8_gemm.cpp)."""
    return torch.ops.mixprec.w4a8_linear(xq, x_scale, packed, scale, bias)


def kv_dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, bits: int,
                       out: torch.Tensor) -> None:
    """Dequantize per-channel KV-cache keys into float32 ``out`` (see csrc/kv_dequant.cpp)."""
    torch.ops.mixprec.kv_dequantize_keys(codes, scale, zero, group, bits, out)


def kv_dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                         out: torch.Tensor) -> None:
    """Dequantize per-token KV-cache values into float32 ``out`` (see csrc/kv_dequant.cpp)."""
    torch.ops.mixprec.kv_dequantize_values(codes, scale, zero, bits, out)


@torch.compiler.assume_constant_result
def kv_attention_available() -> bool:
    """Whether the native build has the decode attention over cache codes (see csrc/kv_attention.cpp)."""
    return available() and bool(torch.ops.mixprec.kv_attention_available())


def llama_decode_layers(hidden: torch.Tensor, weights: list[torch.Tensor], plans: list[int], final_norm: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        position: int, heads: int, kv_heads: int, intermediate: int, eps: float,
                        scaling: float) -> torch.Tensor:
    """Every layer of a Llama-family decoder with ``w4a8`` / ``int8`` projections (``plans``: kernel and few-row
    bound of each) for the rows of ``hidden`` at positions ``[position, position + rows)``, writing their keys and
    values into the caches (see csrc/llama_decode.cpp)."""
    return torch.ops.mixprec.llama_decode_layers(hidden, weights, plans, final_norm, cos, sin, key_cache,
                                                 value_cache, position, heads, kv_heads, intermediate, eps, scaling)


def llama_decode_layers_quantized_kv(hidden: torch.Tensor, weights: list[torch.Tensor], plans: list[int],
                                     final_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                     kv_cache: list[torch.Tensor], position: int, heads: int, kv_heads: int,
                                     intermediate: int, eps: float, scaling: float, bits: int, group: int,
                                     residual: int, value_group: int) -> torch.Tensor:
    """:func:`llama_decode_layers` over a quantized KV cache: the nine tensors of csrc/kv_cache_store.h, updated in
    place (the layout and rounding of :class:`mixprec.nn.kv_cache.QuantizedKV`)."""
    return torch.ops.mixprec.llama_decode_layers_quantized_kv(hidden, weights, plans, final_norm, cos, sin, kv_cache,
                                                              position, heads, kv_heads, intermediate, eps, scaling,
                                                              bits, group, residual, value_group)


def kv_quantize_chunk(keys: torch.Tensor, values: torch.Tensor, bits: int,
                      value_group: int) -> tuple[torch.Tensor, ...]:
    """One chunk of ``[kv_heads, group, head_dim]`` float32 keys and values quantized as the native decoder's KV cache
    quantizes it: key codes, scales and zero points, then the values' (csrc/kv_cache_store.cpp)."""
    return tuple(torch.ops.mixprec.kv_quantize_chunk(keys, values, bits, value_group))


def kv_decode_attention(query: torch.Tensor, key_codes: torch.Tensor, key_scale: torch.Tensor,
                        key_zero: torch.Tensor, value_codes: torch.Tensor, value_scale: torch.Tensor,
                        value_zero: torch.Tensor, recent_keys: torch.Tensor, recent_values: torch.Tensor, group: int,
                        bits: int, scaling: float) -> torch.Tensor:
    """One decode step of attention read from the quantized cache (see csrc/kv_attention.cpp)."""
    return torch.ops.mixprec.kv_decode_attention(query, key_codes, key_scale, key_zero, value_codes, value_scale,
                                                 value_zero, recent_keys, recent_values, group, bits, scaling)


def tflite_conv2d(*args: object) -> torch.Tensor:
    """The integer engine's int8 / 16x8 CONV_2D and DEPTHWISE_CONV_2D (see csrc/tflite_conv.cpp;
    arguments as there)."""
    return torch.ops.mixprec.tflite_conv2d(*args)


def tflite_conv2d_pack(*args: object) -> torch.Tensor:
    """An int8 CONV_2D's weights packed once for an input size (any batch), for tflite_conv2d's ``prepacked``;
    an empty tensor where that convolution does not run as the VNNI or AVX2 GEMM (see csrc/tflite_conv.cpp)."""
    return torch.ops.mixprec.tflite_conv2d_pack(*args)


def tflite_depthwise_pack(*args: object) -> torch.Tensor:
    """An int8 DEPTHWISE_CONV_2D's weights, bias and rescales laid out once in the VNNI kernel's lane order, for
    tflite_conv2d's ``prepacked`` (any input size); an empty tensor where that convolution does not run as that
    kernel (see csrc/tflite_conv.cpp)."""
    return torch.ops.mixprec.tflite_depthwise_pack(*args)


def tflite_sum_middle(x: torch.Tensor) -> torch.Tensor:
    """int8 / int16 ``[outer, middle, inner]`` -> its exact int32 sums over the middle axis
    ``[outer, inner]`` (the integer engine's MEAN; see csrc/tflite_reduce.cpp)."""
    return torch.ops.mixprec.tflite_sum_middle(x)


def tflite_mean_middle(x: torch.Tensor, correction: int, multiplier: int, shift: int, offset: int, low: int,
                       high: int) -> torch.Tensor:
    """int8 / int16 ``[outer, middle, inner]`` -> MEAN's codes of the same type ``[outer, inner]``:
    ``clamp(MBQM(sum - correction, multiplier, shift) + offset, low, high)`` over the middle axis
    (see csrc/tflite_reduce.cpp)."""
    return torch.ops.mixprec.tflite_mean_middle(x, correction, multiplier, shift, offset, low, high)


def tflite_fully_connected(*args: object) -> torch.Tensor:
    """The integer engine's int8 / 16x8 FULLY_CONNECTED on ``[rows, in]`` codes (see
    csrc/tflite_fully_connected.cpp; arguments as there)."""
    return torch.ops.mixprec.tflite_fully_connected(*args)


def tflite_requantize(x: torch.Tensor, input_offset: int, multiplier: int, shift: int, output_offset: int,
                      wide: bool) -> torch.Tensor:
    """int8 / int16 codes -> the same shape on another grid, int16 if ``wide`` else int8:
    ``clamp(MBQM(x + input_offset, multiplier, shift) + output_offset)`` (see csrc/tflite_requantize.cpp)."""
    return torch.ops.mixprec.tflite_requantize(x, input_offset, multiplier, shift, output_offset, wide)


def tflite_quantize_nchw(x: torch.Tensor, scale: float, zero_point: int, wide: bool) -> torch.Tensor:
    """float32 NCHW -> NHWC int16 (``wide``) or int8 codes: ``clamp(round_half_even(x / scale) + zero_point)``,
    the quotient in double (see csrc/tflite_requantize.cpp)."""
    return torch.ops.mixprec.tflite_quantize_nchw(x, scale, zero_point, wide)


def tflite_dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """int8 / int16 codes -> float32 ``(q - zero_point) * scale``, computed in double and rounded once
    (see csrc/tflite_requantize.cpp)."""
    return torch.ops.mixprec.tflite_dequantize(q, scale, zero_point)


def tflite_add(a: torch.Tensor, b: torch.Tensor, *record: int) -> torch.Tensor:
    """The integer engine's ADD of two same-shaped int8 / int16 tensors; ``record``: the offsets of a
    and b, a's and b's multiplier and shift, the output's multiplier, shift and offset, the activation
    range (see csrc/tflite_add.cpp)."""
    return torch.ops.mixprec.tflite_add(a, b, *record)


def tflite_add_lookup(a: torch.Tensor, b: torch.Tensor, table: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
    """``table[(a + 128) * 256 + b + 128]`` for same-shaped int8 ``a``, ``b``: an int8 ADD from its
    65,536 precomputed codes, most of them estimated by ``fit`` (:func:`tflite_add_fit` of the same table)
    and the rest read (see csrc/tflite_add.cpp)."""
    return torch.ops.mixprec.tflite_add_lookup(a, b, table, fit)


def tflite_add_fit(table: torch.Tensor, *record: int) -> torch.Tensor:
    """The float32 estimate of an int8 ADD's table that :func:`tflite_add_lookup` runs, checked against the
    table on every pair of codes; ``record`` as :func:`tflite_add`'s (see csrc/tflite_add.cpp)."""
    return torch.ops.mixprec.tflite_add_fit(table, *record)


def tflite_run_program(inputs: list[torch.Tensor], constants: list[torch.Tensor], ops: list[str],
                       program: torch.Tensor) -> torch.Tensor:
    """An integer graph's operators in one call: ``program``'s steps (int64) call ``ops`` on the inputs,
    constants and earlier results (see csrc/tflite_program.cpp and mixprec/integer/graph/native_plan.py)."""
    return torch.ops.mixprec.tflite_run_program(inputs, constants, ops, program)


def tflite_program(inputs: int, constants: list[torch.Tensor], ops: list[str], program: torch.Tensor) -> object:
    """:func:`tflite_run_program`'s program decoded and checked once, held with its constants: ``.run(inputs)``
    and ``.run_one(input)`` run it from Python directly (no dispatcher, no conversion of the constants per call)."""
    if (reason := load_error()) is not None:
        raise RuntimeError(f"the native kernels are not available: {reason}")
    return _module.Program(inputs, constants, ops, program)


def kws_pipeline(*args: object) -> tuple[torch.Tensor, int]:
    """The fused keyword-spotting pipeline (see csrc/kws_pipeline.cpp; arguments as there)."""
    return torch.ops.mixprec.kws_pipeline(*args)
