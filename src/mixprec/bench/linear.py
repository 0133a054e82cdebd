"""One Linear layer (default 4096 x 4096) in every mixprec precision against float32,
PyTorch's own dynamic int8 and the peer libraries, at several batch sizes M.

All paths are timed in one process, interleaved, median of ``rounds`` rounds; the
result is the time per call and the speed-up over float32. The :data:`COMPILED` paths are
timed again under ``torch.compile`` (default inductor backend, static shapes: one graph per M,
compiled at its first call, before any timing).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mixprec.bench.peers import PEERS, allow_compiled_versions, build_peer, compiled_name, failure_reason
from mixprec.bench.sweep import batch_sweep
from mixprec.nn import Int8DynamicLinear
from mixprec.quantize import quantize
from mixprec.timing import SPIN_SETTLE_SECONDS

BATCHES = (1, 8, 128, 1024)
PRECISIONS = ("int8", "int8-static", "int8-asym", "w8", "w4", "w4a8", "bf16", "fp16")
#: Left out of this sweep: 100x slower than float32, one call at M = 1024 would take minutes.
SKIPPED_PEERS = ("torchao int4 weight-only, fp32 act",)
#: Paths also timed under ``torch.compile``, as "<name>, compiled".
COMPILED = ("fp32", "mixprec int8", "mixprec w8", "mixprec w4", "mixprec w4a8", "torchao int8 dynamic (eager)",
            "torchao int4 weight-only, bf16 act")


def candidates(features: int) -> tuple[dict[str, Callable[[Tensor], Tensor]], dict[str, str], dict[str, str]]:
    """Every path by name, the kernel each mixprec path runs, and why a peer did not build."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(features, features)).eval()
    paths: dict[str, Callable[[Tensor], Tensor]] = {"fp32": layer}
    kernels, failures = {}, {}
    for precision in PRECISIONS:
        model = copy.deepcopy(layer)
        quantize(model, precision, calibration=[torch.randn(64, features)] if precision == "int8-static" else None)
        paths[f"mixprec {precision}"] = model
        kernels[f"mixprec {precision}"] = model[0].kernel
    forced = nn.Sequential(Int8DynamicLinear.from_float(layer[0]))
    paths["mixprec int8, _int_mm forced"] = forced
    kernels["mixprec int8, _int_mm forced"] = forced[0].kernel
    for name in PEERS:
        if name in SKIPPED_PEERS:
            continue
        try:
            paths[name] = build_peer(name, copy.deepcopy(layer))
        except Exception as exc:  # a missing or broken peer is reported, never hidden
            failures[name] = failure_reason(exc)
    for name in COMPILED:
        if name in paths:
            paths[compiled_name(name)] = torch.compile(paths[name], dynamic=False)
    return paths, kernels, failures


def run(features: int, rounds: int) -> tuple[list[dict[str, object]], list[str], dict[str, str], dict[str, str]]:
    """Table rows and columns (see :func:`~mixprec.bench.sweep.batch_sweep`), kernels, failures."""
    paths, kernels, failures = candidates(features)
    with allow_compiled_versions(len(BATCHES) * len(COMPILED)):
        rows, columns = batch_sweep(paths, lambda batch: torch.randn(batch, features), BATCHES, rounds,
                                    prefix="M", unit="ms", min_seconds=0.1, settle_seconds=SPIN_SETTLE_SECONDS)
    return rows, columns, kernels, failures
