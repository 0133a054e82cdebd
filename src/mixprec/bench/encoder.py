"""The BERT-shaped encoder benchmark (issue 3): 6 layers, hidden 384, FFN 1536, 12 heads,
batch 8 x sequence 128, in every mixprec policy beside float32 and the peer libraries.

Speed: all paths in one process, interleaved, median of ``rounds`` rounds; ratio to the
float32 eager model. Memory: each path is built again in a fresh child process that
reports anonymous resident memory (see :mod:`mixprec.bench.process_memory`), after building and
running the same path on a tiny encoder so that one-time costs (imports, native builds,
thread pools) are left out: ``steady`` is what
the process holds after building the path and running it once, minus what it held before
the float32 model existed; ``quantize_peak`` is the highest (sampled every 0.5 ms) while
building the path, minus what the process held with the float32 model alone (the extra
memory quantizing needs).
"""

from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from mixprec.accounting import model_bytes
from mixprec.bench import process_memory
from mixprec.bench.encoder_model import Encoder
from mixprec.bench.peers import COMPILED_SUFFIX, PEERS, Forward, build_peer, compiled_name, failure_reason
from mixprec.policy import Policy
from mixprec.quantize import quantize
from mixprec.timing import SPIN_SETTLE_SECONDS, interleaved_medians

ATTENTION = r"layers\.\d+\.attention\.(query|key|value|output)"
FFN = r"layers\.\d+\.ffn\.(up|down)"

#: mixprec paths: a policy for the encoder's linears.
POLICIES: dict[str, Policy] = {
    "mixprec bf16": Policy(default="bf16"),
    "mixprec fp16": Policy(default="fp16"),
    "mixprec int8": Policy(default="int8"),
    "mixprec w8": Policy(default="w8"),
    "mixprec w4": Policy(default="w4"),
    "mixprec w4a8": Policy(default="w4a8"),
    "mixprec mixed: attention bf16, FFN int8": Policy(default="fp32", rules=[(ATTENTION, "bf16"), (FFN, "int8")]),
    "mixprec mixed: attention int8, FFN bf16": Policy(default="fp32", rules=[(ATTENTION, "int8"), (FFN, "bf16")]),
}


#: Paths also timed under ``torch.compile`` (default inductor backend, static shapes), as "<name>, compiled".
COMPILED = ("fp32", "mixprec int8", "mixprec w4a8", "mixprec mixed: attention bf16, FFN int8",
            "torch bf16 (whole model .bfloat16())", "torchao int8 dynamic (eager)")


@dataclass(frozen=True)
class EncoderShape:
    layers: int = 6
    hidden: int = 384
    heads: int = 12
    ffn: int = 1536
    batch: int = 8
    seq: int = 128

    def model(self) -> Encoder:
        torch.manual_seed(0)
        return Encoder(self.layers, self.hidden, self.heads, self.ffn).eval()

    def input(self) -> Tensor:
        return torch.randn(self.batch, self.seq, self.hidden, generator=torch.Generator().manual_seed(1))


def _whole_model_bf16(model: nn.Module) -> Forward:
    model = model.to(torch.bfloat16)
    return lambda x: model(x.to(torch.bfloat16)).float()


def _mixprec(policy: Policy) -> Callable[[nn.Module], Forward]:
    def build(model: nn.Module) -> Forward:
        quantize(model, policy)
        return model
    return build


def _compiled(build: Callable[[nn.Module], Forward]) -> Callable[[nn.Module], Forward]:
    """The same path under ``torch.compile`` (compiled at its first call, before any timing)."""
    return lambda model: torch.compile(build(model), dynamic=False)


def path_builders() -> dict[str, Callable[[nn.Module], Forward]]:
    """Every path by name: float32, each mixprec policy, whole-model bf16, the peers, and the
    :data:`COMPILED` ones again under ``torch.compile``."""
    builders: dict[str, Callable[[nn.Module], Forward]] = {"fp32": lambda model: model}
    builders.update({name: _mixprec(policy) for name, policy in POLICIES.items()})
    builders["torch bf16 (whole model .bfloat16())"] = _whole_model_bf16
    builders.update({name: (lambda model, name=name: build_peer(name, model)) for name in PEERS})
    builders.update({compiled_name(name): _compiled(builders[name]) for name in COMPILED})
    return builders


def time_paths(shape: EncoderShape, rounds: int,
               only: Sequence[str] | None = None) -> tuple[dict[str, float], dict[str, str], dict[str, float]]:
    """Median seconds per forward of every path (or those named in ``only``; fp32 always)
    that builds, why the others did not, and each path's largest output difference from
    float32 relative to the float32 output's largest magnitude."""
    base, x = shape.model(), shape.input()
    forwards, failures = {}, {}
    builders = path_builders()
    if only is not None:
        unknown = sorted(set(only) - set(builders))
        if unknown:
            raise ValueError(f"unknown encoder paths {unknown}; choose from {sorted(builders)}")
        builders = {name: build for name, build in builders.items() if name == "fp32" or name in only}
    for name, build in builders.items():
        try:
            forwards[name] = build(copy.deepcopy(base))
        except Exception as exc:  # a missing or broken peer is reported, never hidden
            failures[name] = failure_reason(exc)
    with torch.no_grad():
        reference = forwards["fp32"](x)
        errors = {name: float((f(x).float() - reference).abs().max() / reference.abs().max())
                  for name, f in forwards.items()}
        medians = interleaved_medians({name: (lambda f=f: f(x)) for name, f in forwards.items()}, rounds,
                                      min_seconds=0.2, settle_seconds=SPIN_SETTLE_SECONDS)
    return medians, failures, errors


def memory_child(name: str, shape: EncoderShape) -> dict[str, int]:
    """Run in a fresh process: resident bytes of building and running one path."""
    # Build and run the same path once on a tiny encoder first, so imports, native builds
    # and lazily created thread pools are in place before the baseline is taken.
    tiny = EncoderShape(layers=1, hidden=64, heads=4, ffn=128, batch=1, seq=4)
    with torch.no_grad():
        path_builders()[name](tiny.model())(tiny.input())
    x = shape.input()
    gc.collect()
    before_model = process_memory.anon_bytes()
    model = shape.model()
    fp32_bytes = model_bytes(model)
    gc.collect()
    with_model = process_memory.anon_bytes()
    with process_memory.PeakSampler() as sampler:
        forward = path_builders()[name](model)
        del model
        gc.collect()
    quantize_peak = sampler.peak - with_model
    with torch.no_grad():
        forward(x)
    gc.collect()
    return {"fp32_weight_bytes": fp32_bytes, "steady": process_memory.anon_bytes() - before_model,
            "quantize_peak": quantize_peak}


def measure_memory(name: str, shape: EncoderShape) -> dict[str, int] | str:
    """:func:`memory_child` in a child process; a string says why it failed."""
    command = [sys.executable, "-m", "mixprec.bench.encoder", name, json.dumps(asdict(shape))]
    result = subprocess.run(command, capture_output=True, text=True, env=process_memory.child_environment(),
                            check=False)
    if result.returncode != 0:
        return (result.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(result.stdout.strip().splitlines()[-1])


def largest_layer_bytes(shape: EncoderShape) -> int:
    """Float32 bytes of the encoder's largest Linear (weight and bias)."""
    return max(sum(t.nbytes for t in m.state_dict().values()) for m in shape.model().modules()
               if isinstance(m, nn.Linear))


def run(shape: EncoderShape, rounds: int, memory: bool = True,
        only: Sequence[str] | None = None) -> tuple[list[dict[str, object]], dict[str, str]]:
    """Table rows for every path (or those in ``only``) that builds (speed, error, and
    with ``memory`` the resident-memory figures), and the failures by path name."""
    medians, failures, errors = time_paths(shape, rounds, only)
    if memory and not process_memory.supported():
        failures["memory"] = "resident memory needs Linux /proc/self/status; measured speed only"
        memory = False
    largest = largest_layer_bytes(shape)
    rows = []
    fp32_steady = None
    for name, seconds in medians.items():
        row: dict[str, object] = {"path": name, "ms": round(seconds * 1e3, 2),
                                  "vs_fp32": round(medians["fp32"] / seconds, 2), "max_rel_error": errors[name]}
        if memory and name.endswith(COMPILED_SUFFIX):  # compiling leaves the stored weights as they are
            row.update({"steady_bytes": "", "quantize_peak_bytes": "", "peak_vs_largest_layer": ""})
        elif memory:
            figures = measure_memory(name, shape)
            if isinstance(figures, str):
                failures[f"{name} (memory)"] = figures
                figures = {"steady": -1, "quantize_peak": -1}
            fp32_steady = figures["steady"] if name == "fp32" else fp32_steady
            row.update({"steady_bytes": figures["steady"], "quantize_peak_bytes": figures["quantize_peak"],
                        "peak_vs_largest_layer": round(figures["quantize_peak"] / largest, 2)})
        rows.append(row)
    if memory and fp32_steady:
        for row in rows:
            steady = row["steady_bytes"]
            row["steady_vs_fp32"] = round(steady / fp32_steady, 3) if isinstance(steady, int) else ""
    return rows, failures


def summary(rows: list[dict[str, object]]) -> str:
    """The best mixprec path against float32 and against the best peer path."""
    speed = {str(row["path"]): float(row["vs_fp32"]) for row in rows}  # type: ignore[arg-type]
    ours = max((name for name in speed if name.startswith("mixprec")), key=speed.__getitem__)
    peers = [name for name in speed if not name.startswith("mixprec") and name != "fp32"]
    text = f"best mixprec path: {ours}, {speed[ours]:.2f}x fp32"
    if peers:
        best_peer = max(peers, key=speed.__getitem__)
        text += f"; best other path: {best_peer}, {speed[best_peer]:.2f}x fp32 ({speed[ours] / speed[best_peer]:.2f}x)"
    return text


if __name__ == "__main__":
    print(json.dumps(memory_child(sys.argv[1], EncoderShape(**json.loads(sys.argv[2])))))
