"""The keyword-spotting topology of the integer engine, as a float PyTorch model and as a
mixed pipeline built from it:

    int8 input [S, F] -> int8 FULLY_CONNECTED F->E + ReLU (per step) -> bridge to half
    -> mean_s(h + linear_attention(h)) in the half island -> bridge to int8
    -> int8 FULLY_CONNECTED E->classes -> int8 logits

:class:`KeywordSpotter` computes the same function in float32 (the reference the pipeline is
measured against); :func:`build_pipeline` calibrates every int8 tensor on data it is given.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from mixprec.errors import InputError
from mixprec.integer.build.layers import (
    activation_types,
    calibrate_as,
    fully_connected_from,
    linear_attention_from,
)
from mixprec.integer.core.tensors import CODE_RANGES, Quantization, TensorSpec
from mixprec.integer.graph.graph import Graph
from mixprec.integer.graph.simulate import exact_operator, linear_attention_exact, onto_grid
from mixprec.integer.half.pipeline import AttentionPoolStage, IntegerStage, Pipeline, ToHalfStage, ToInt8Stage


class LinearAttentionHead(nn.Module):
    """Single-head linear attention with the ReLU feature map (float32 reference of
    :func:`mixprec.integer.half.ops.linear_attention`)."""

    def __init__(self, width: int, epsilon: float = 1.0) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.epsilon = epsilon

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = torch.relu(self.query(h)), torch.relu(self.key(h)), self.value(h)
        kv = k.transpose(-1, -2) @ v
        normalizer = (q * k.sum(dim=-2, keepdim=True)).sum(dim=-1, keepdim=True) + self.epsilon
        return (q @ kv) / normalizer


class KeywordSpotter(nn.Module):
    """``[B, S, F]`` features -> ``[B, classes]`` logits (see module docstring)."""

    def __init__(self, features: int = 8, width: int = 8, classes: int = 4, epsilon: float = 1.0) -> None:
        super().__init__()
        self.frontend = nn.Linear(features, width)
        self.attention = LinearAttentionHead(width, epsilon)
        self.classifier = nn.Linear(width, classes)

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor the pipeline quantizes: input, frontend output, pooled, logits."""
        h = torch.relu(self.frontend(x))
        pooled = (h + self.attention(h)).mean(dim=-2)
        return {"input": x, "frontend": h, "pooled": pooled, "logits": self.classifier(pooled)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)["logits"]


#: The integer stages of the pipeline whose activation type can be chosen.
KWS_STAGES = ("frontend", "classifier")


def build_pipeline(model: KeywordSpotter, calibration: torch.Tensor, dtype: str = "float16",
                   activations: str | Mapping[str, str] = "int8") -> Pipeline:
    """The mixed pipeline of ``model``, every integer grid calibrated on ``calibration`` ``[N, S, F]``:
    int8 activations, ``activations="int16"`` for TFLite's 16x8 mode (symmetric int16 grids,
    int64 biases; the weights stay int8), or one type per stage of :data:`KWS_STAGES` (absent
    stages int8; each stage's bridge to or from the half island takes its type)."""
    types = activation_types(KWS_STAGES, activations)
    if not isinstance(model, KeywordSpotter):
        raise InputError(f"build_pipeline takes a KeywordSpotter, got {type(model).__name__}")
    if calibration.ndim != 3 or calibration.shape[-1] != model.frontend.in_features:
        raise InputError(f"calibration data must be [N, steps, {model.frontend.in_features}], "
                         f"got {tuple(calibration.shape)}")
    with torch.no_grad():  # in float64, so the grids do not hang on float32 summation order
        observed = copy.deepcopy(model).double().stages(calibration.double())
    front, back = types["frontend"], types["classifier"]
    quants = {name: calibrate_as(front if name in ("input", "frontend") else back, values)
              for name, values in observed.items()}
    steps, features = calibration.shape[1:]
    width = model.frontend.out_features
    frontend = Graph((TensorSpec("features", (1, steps, features), quants["input"], front),),
                     (fully_connected_from(model.frontend, 0, quants["input"], quants["frontend"], "relu",
                                           activations=front),))
    classifier = Graph((TensorSpec("pooled", (1, width), quants["pooled"], back),),
                       (fully_connected_from(model.classifier, 0, quants["pooled"], quants["logits"],
                                             activations=back),))
    head = model.attention
    attention = linear_attention_from(head.query, head.key, head.value, head.epsilon, dtype)
    return Pipeline(quants["input"], (steps, features), (
        IntegerStage(f"frontend_{front}", frontend),
        ToHalfStage("bridge_to_half", quants["frontend"], dtype, (steps, width), front),
        AttentionPoolStage("attention_pool_half", attention, (steps, width)),
        ToInt8Stage(f"bridge_to_{back}", quants["pooled"], (width,), back),
        IntegerStage(f"classifier_{back}", classifier),
    ))


def parity(pipeline: Pipeline, model: KeywordSpotter, x: torch.Tensor) -> dict[str, float]:
    """The pipeline's dequantized logits on ``x`` against the float model (``float_*``) and
    against :func:`simulate` (``engine_*``, the engine's own error): worst absolute error, in
    output steps (LSB), and as a fraction of the float logits' range; the share of outputs
    that differ from the simulation; argmax agreement with the float model; the share of
    outputs saturated at the calibrated grid's ends and the worst error among the others;
    ``int16_worst_of_range``: the same against :func:`simulate` with int16 activations."""
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double()).numpy()
    codes = pipeline.run_codes(x.float().numpy())
    got = pipeline.output_quant.values_of(codes)
    simulated = simulate(pipeline, x.double().numpy())
    step, span = float(pipeline.output_quant.scale32[0]), float(reference.max() - reference.min())
    result = {"range": span, "step": step, "agreement": float((got.argmax(-1) == reference.argmax(-1)).mean()),
              "engine_differing": float((got != simulated).mean())}
    for label, target in (("float", reference), ("engine", simulated)):
        worst = float(np.abs(got - target).max())
        result |= {f"{label}_worst": worst, f"{label}_worst_lsb": worst / step, f"{label}_worst_of_range": worst / span}
    int16 = simulate(pipeline, x.double().numpy(), activation_bits=16)
    result["int16_worst_of_range"] = float(np.abs(int16 - reference).max() / span)
    low, high = CODE_RANGES[pipeline.stages[-1].output_kind]
    inside = (codes > low) & (codes < high)  # outputs not clipped at the calibrated range's ends
    result["saturated"] = float((~inside).mean())
    result["float_worst_unsaturated_lsb"] = float(np.abs(got - reference)[inside].max(initial=0.0) / step)
    return result


def simulate(pipeline: Pipeline, x: np.ndarray, activation_bits: int = 8) -> np.ndarray:
    """The pipeline's function in float64 without its arithmetic: the same int8 weights, int32
    biases, half weights and activation grids, but exact products and sums, exact attention
    (no half rounding inside it) and one rounding per int8 tensor (half to even). The
    pipeline's difference from this is the engine's own error. ``activation_bits=16``: every
    int8 tensor (the input too) on its int16 counterpart instead
    (:func:`mixprec.integer.graph.simulate.onto_grid`), what TFLite's 16x8 mode would give."""
    frontend, to_half, pool, to_int8, classifier = pipeline.stages
    assert isinstance(frontend, IntegerStage) and isinstance(pool, AttentionPoolStage)

    def grid(values: np.ndarray, quant: Quantization, codes: str) -> np.ndarray:
        if codes == "int16":  # int16 stages' grids are int16 already
            return quant.values_of(quant.nearest_codes(values, "int16"))
        return onto_grid(values, quant, activation_bits)

    front, back = frontend.input_kind, classifier.input_kind
    inputs = grid(np.asarray(x, np.float64), pipeline.input_quant, front)
    h = grid(exact_operator(frontend.graph.nodes[0], [inputs], [pipeline.input_quant]), to_half.quant, front)
    att = pool.attention
    q, k, v = (h @ layer.weight.T.astype(np.float64) + layer.bias for layer in (att.query, att.key, att.value))
    pooled = grid((h + linear_attention_exact(q, k, v, att.epsilon)).mean(axis=-2), to_int8.quant, back)
    return grid(exact_operator(classifier.graph.nodes[0], [pooled], [to_int8.quant]), pipeline.output_quant, back)


class FusedKeywordSpotter:
    """The pipeline of :func:`build_pipeline` as one native pass
    (``mixprec/kernels/csrc/kws_pipeline.cpp``), bit-identical to calling the pipeline: the
    same records, the same arithmetic, in blocks of 16 samples. Needs the native kernels."""

    def __init__(self, pipeline: Pipeline) -> None:
        from mixprec.kernels import native

        if not native.available():
            raise InputError(f"the fused keyword spotter needs mixprec's native kernels: {native.load_error()}")
        kinds = [type(stage) for stage in pipeline.stages]
        if kinds != [IntegerStage, ToHalfStage, AttentionPoolStage, ToInt8Stage, IntegerStage] or any(
                len(stage.graph.nodes) != 1 for stage in (pipeline.stages[0], pipeline.stages[4])):
            raise InputError("FusedKeywordSpotter takes the pipeline build_pipeline makes "
                             "(frontend, bridge, attention pool, bridge, classifier)")
        if pipeline.input_kind != "int8":
            raise InputError("FusedKeywordSpotter runs the int8 pipeline; run a 16x8 one as pipeline(x)")
        frontend, to_half, pool, to_int8, classifier = pipeline.stages
        self.pipeline = pipeline
        attention = pool.attention
        layers = (attention.query, attention.key, attention.value)
        self._args = (
            *self._dense(frontend.graph), torch.from_numpy(to_half.table.copy()),
            torch.from_numpy(np.stack([layer.weight for layer in layers])),
            torch.from_numpy(np.stack([self._bias(layer) for layer in layers])), float(attention.epsilon),
            int(attention.dtype == "bfloat16"), float(to_int8.quant.scale32[0]), int(to_int8.quant.zero_point[0]),
            *self._dense(classifier.graph))
        self._native = native

    @staticmethod
    def _bias(layer) -> np.ndarray:  # noqa: ANN001
        return layer.bias if layer.bias is not None else np.zeros(layer.weight.shape[0], np.float32)

    @staticmethod
    def _dense(graph: Graph) -> tuple:
        record = graph.records[0]
        out_features = record.weights.shape[0]
        bias = record.bias if record.bias is not None else np.zeros(out_features, np.int32)
        return (torch.from_numpy(np.ascontiguousarray(record.weights)), torch.from_numpy(bias.copy()),
                torch.from_numpy(record.multiplier.copy()), torch.from_numpy(record.shift.copy()),
                record.input_offset, record.output_offset, record.activation_min, record.activation_max)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """int8 ``[B, S, F]`` -> int8 logits ``[B, classes]``, as ``pipeline(x)``."""
        self.pipeline.check_input(x)
        out, nan_count = self._native.kws_pipeline(torch.from_numpy(np.ascontiguousarray(x)), *self._args)
        if nan_count:
            raise InputError(f"{nan_count} NaN values reached the half -> int8 bridge; NaN has no int8 code "
                             "(find where the half-precision island produced them)")
        return out.numpy()
