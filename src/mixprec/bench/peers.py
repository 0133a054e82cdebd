"""Peer implementations that benchmarks compare against, built by name.

Each builder takes a float32 model it may modify or consume and returns a callable on
float32 input. Peers that are not installed (``pip install -e '.[bench]'``) or fail to
build raise; callers report the reason instead of hiding the row.
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mixprec.kernels.cpu import cpu_flags
from mixprec.kernels.onednn_int8 import INT8_FLAGS

Forward = Callable[[Tensor], Tensor]


def torch_dynamic_int8(model: nn.Module, engine: str) -> Forward:
    """PyTorch's eager dynamic int8 (``torch.ao`` ``quantize_dynamic`` as users call it, which
    returns a quantized copy; per-tensor activations), packed for ``engine`` (``x86`` or
    ``onednn``); the returned callable sets that engine before every call so engines can
    interleave."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        torch.backends.quantized.engine = engine
        quantized = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)

    def run(x: Tensor) -> Tensor:
        torch.backends.quantized.engine = engine
        return quantized(x)

    return run


def torchao_int8_dynamic(model: nn.Module) -> Forward:
    """torchao ``Int8DynamicActivationInt8WeightConfig``, eager (not compiled)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def _torchao_int4(model: nn.Module, dtype: torch.dtype) -> Forward:
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    model = model.to(dtype)
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=32))
    return lambda x: model(x.to(dtype)).float()


def torchao_int4_bf16(model: nn.Module) -> Forward:
    """torchao's int4 weight-only CPU prototype (group 32, ``_weight_int4pack_mm_for_cpu``), bf16 activations."""
    return _torchao_int4(model, torch.bfloat16)


def torchao_int4_fp32(model: nn.Module) -> Forward:
    """The same with float32 activations."""
    return _torchao_int4(model, torch.float32)


def onnxruntime_reduce_range() -> bool:
    """Whether ONNX Runtime's quantizer should be given ``reduce_range=True`` (7-bit weights) on this
    CPU: its documentation advises it for uint8 x int8 on x86 without VNNI, where the int16 pair sums
    of ``vpmaddubsw`` saturate (measured on an AVX2 CPU: the tiny encoder's largest relative error
    0.054 with 8-bit weights, 0.0034 with 7-bit ones, 0.0030 with 8-bit ones on AVX512-VNNI)."""
    return platform.machine() in ("x86_64", "AMD64") and not cpu_flags() & set(INT8_FLAGS)


def onnxruntime_dynamic_int8(model: nn.Module) -> Forward:
    """ONNX Runtime's own dynamic int8 as its users call it: the float32 model exported by PyTorch's
    TorchScript exporter (its input ``[batch, seq, features]`` with both leading axes dynamic;
    ``features`` = the first Linear's ``in_features``; a ``[rows, features]`` input runs as one
    batch), then ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, its defaults but
    :func:`onnxruntime_reduce_range`), run on the CPU provider with PyTorch's thread count."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    first = next((module for module in model.modules() if isinstance(module, nn.Linear)), None)
    if first is None:
        raise ValueError("the ONNX Runtime peer needs a model with an nn.Linear (its in_features give the input width)")
    example = torch.zeros(1, 2, first.in_features)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="mixprec-ort-peer-") as folder:
        float_file, int8_file = Path(folder) / "float32.onnx", Path(folder) / "int8.onnx"
        torch.onnx.export(model, (example,), str(float_file), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch", 1: "seq"}})
        quantize_dynamic(str(float_file), str(int8_file), weight_type=QuantType.QInt8,
                         reduce_range=onnxruntime_reduce_range())
        session = ort.InferenceSession(str(int8_file), options, providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Tensor:
        if x.dim() not in (2, 3):
            raise ValueError(f"the ONNX Runtime peer takes [rows, features] or [batch, seq, features], got {x.dim()}-D")
        out = torch.from_numpy(session.run(None, {"x": (x if x.dim() == 3 else x[None]).numpy()})[0])
        return out if x.dim() == 3 else out[0]

    return run


def quanto_w8a8(model: nn.Module) -> Forward:
    """optimum-quanto int8 weights and int8 activations, frozen."""
    from optimum import quanto

    quanto.quantize(model, weights=quanto.qint8, activations=quanto.qint8)
    quanto.freeze(model)
    return model


PEERS: dict[str, Callable[[nn.Module], Forward]] = {
    "torch dynamic int8 (x86/fbgemm)": lambda model: torch_dynamic_int8(model, "x86"),
    "torch dynamic int8 (onednn)": lambda model: torch_dynamic_int8(model, "onednn"),
    "torchao int8 dynamic (eager)": torchao_int8_dynamic,
    "torchao int4 weight-only, bf16 act": torchao_int4_bf16,
    "torchao int4 weight-only, fp32 act": torchao_int4_fp32,
    "optimum-quanto W8A8": quanto_w8a8,
    "ONNX Runtime dynamic int8 (its quantize_dynamic)": onnxruntime_dynamic_int8,
}


#: Suffix of a compiled path's name.
COMPILED_SUFFIX = ", compiled"


def compiled_name(name: str) -> str:
    """The name of path ``name`` under ``torch.compile`` (a peer's "(eager)" dropped)."""
    return name.removesuffix(" (eager)") + COMPILED_SUFFIX


def allow_compiled_versions(versions: int) -> contextlib.AbstractContextManager:
    """Dynamo's recompile limits raised to ``versions`` inside the block: every compiled path compiles the same
    forward code again (per path and input shape), and past the default of 8 versions per code object dynamo
    would silently run the rest eagerly."""
    return torch._dynamo.config.patch(recompile_limit=versions, accumulated_recompile_limit=4 * versions)


def failure_reason(exc: BaseException) -> str:
    """One line saying why a path did not build: the exception type and its first line."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def build_peer(name: str, model: nn.Module) -> Forward:
    """The peer ``name`` (a key of :data:`PEERS`) applied to ``model``."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PEERS[name](model)
