"""Decoding with the quantized weights in 2 MiB pages against the same weights in 4 KiB pages (issue 18, item 2).

    .venv/bin/python benchmarks/huge_pages.py [--policy "w4a8g32 / head int8"] [--rounds 9] [--out runs/huge-pages]

The 1.17B Llama shape of ``benchmarks/decode.py`` (random weights, seed 0; 22 layers, hidden 2048, MLP 5632)
quantized by ``mixprec.quantize`` with one of that benchmark's policies: mixprec's weight buffers then lie in memory
advised for transparent huge pages and oneDNN's packed ``int8`` weights are collapsed into them
(``mixprec.kernels.huge_pages``). The same model built and quantized again with ``MIXPREC_HUGE_PAGES=0`` holds the
same values in ordinary memory (4 KiB pages). The decoder built on the first model moves the layers' tensors, one
after another, into one huge-page mapping (``gather_in_huge_pages``: the scales and biases too, each too small
for a huge page alone); a decoder built on it before, under ``MIXPREC_HUGE_PAGES=0``, keeps each tensor in its own
mapping ("per tensor": whole 2 MiB pages of each buffer of 2 MiB or more in huge pages, the rest, scales
included, in 4 KiB pages; its KV cache in 4 KiB pages too, 3 MB here). Each model decodes one token after a
64-token prompt through ``mixprec.NativeLlamaDecoder`` (``--eager``: also through the model's own forward), the
cache cut back after each step, in interleaved rounds of blocks of at least 0.5 s, each block after a 50 ms pause
and one untimed call; a 1 GiB float32 sum in each kind of page is timed in every round too (this machine's DRAM
read rate has a slow and a fast phase, minutes apart: every round is printed with its sums).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import mixprec
from mixprec.bench.decoding import BANDWIDTH_ARRAY_BYTES, decode_step_bytes, native_decode_step, torch_decode_step
from mixprec.kernels.huge_pages import transparent_huge_pages, zeros_in_huge_pages
from mixprec.report.results import print_table, write_csv
from mixprec.timing import paused_garbage_collector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import MIXPREC_POLICIES, llama_1b  # noqa: E402

VOCABULARY = 49152  # SmolLM2's, as benchmarks/decode.py
PROMPT_TOKENS = 64


def anon_huge_pages_mb() -> float:
    """The process's anonymous memory in transparent huge pages, MB (``/proc/self/smaps_rollup``)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def rates(candidates: dict[str, Callable[[], object]], rounds: int, min_seconds: float = 0.5) -> dict[str, list]:
    """Calls per second of each candidate in each of ``rounds`` interleaved rounds (order rotating per round)."""
    names = list(candidates)
    result: dict[str, list] = {name: [] for name in names}
    with paused_garbage_collector():
        for round_index in range(rounds):
            for name in names[round_index % len(names):] + names[:round_index % len(names)]:
                call = candidates[name]
                time.sleep(0.05)
                call()
                start, calls = time.perf_counter(), 0
                while time.perf_counter() - start < min_seconds:
                    call()
                    calls += 1
                result[name].append(calls / (time.perf_counter() - start))
            latest = ", ".join(f"{name} {values[-1]:.2f}" for name, values in result.items())
            print(f"round {round_index + 1}, calls/s: {latest}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="w4a8g32 / head int8", choices=sorted(MIXPREC_POLICIES))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--eager", action="store_true", help="also time the model's own forward")
    parser.add_argument("--out", type=Path, default=Path("runs/huge-pages"))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    torch.set_num_threads(2)
    print(f"transparent huge pages: {transparent_huge_pages()}", flush=True)
    model = llama_1b(VOCABULARY)
    mixprec.quantize(model, MIXPREC_POLICIES[args.policy])
    huge_mb = anon_huge_pages_mb()
    os.environ["MIXPREC_HUGE_PAGES"] = "0"  # the same model again, every buffer in ordinary pages
    plain = llama_1b(VOCABULARY)
    mixprec.quantize(plain, MIXPREC_POLICIES[args.policy])
    step_bytes = decode_step_bytes(model, model.get_input_embeddings())
    prompt = torch.arange(PROMPT_TOKENS) + 100
    candidates: dict[str, Callable[[], object]] = {}
    # The per-tensor decoder first: the gathering one gives the model's modules the moved tensors.
    for pages, held, wanted in (("2 MiB pages per tensor", model, "0"), ("2 MiB pages", model, "1"),
                                ("4 KiB pages", plain, "0")):
        os.environ["MIXPREC_HUGE_PAGES"] = wanted  # the decoder's KV cache and its gathering too
        decoder = mixprec.NativeLlamaDecoder(held, max_length=PROMPT_TOKENS + 1)
        candidates[f"{pages}, native"] = native_decode_step(decoder, prompt)
    del os.environ["MIXPREC_HUGE_PAGES"]
    if args.eager:
        candidates["2 MiB pages, eager"] = torch_decode_step(model, prompt)
        candidates["4 KiB pages, eager"] = torch_decode_step(plain, prompt)
    plain_array = torch.ones(BANDWIDTH_ARRAY_BYTES // 4)
    huge_array = zeros_in_huge_pages((BANDWIDTH_ARRAY_BYTES // 4,), torch.float32).fill_(1.0)
    sums = {"sum, 2 MiB pages": huge_array.sum, "sum, 4 KiB pages": plain_array.sum}
    measured = rates({**candidates, **sums}, args.rounds)
    def paired(name: str, other: str) -> float | str:
        """The median over rounds of name's rate / other's rate ("" where other is name or not timed)."""
        if other == name or other not in measured:
            return ""
        return round(statistics.median(a / b for a, b in zip(measured[name], measured[other], strict=True)), 3)

    rows = []
    for name in candidates:
        tokens = statistics.median(measured[name])
        rows.append({"path": f"{args.policy}, {name}", "MB/token": round(step_bytes / 1e6),
                     "decode tok/s": round(tokens, 2), "GB/s read": round(tokens * step_bytes / 1e9, 1),
                     "x 4 KiB pages (median of rounds)": paired(name, re.sub("2 MiB pages( per tensor)?", "4 KiB pages",
                                                                             name)),
                     "x per tensor (median of rounds)": paired(name, name.replace("2 MiB pages,",
                                                                                  "2 MiB pages per tensor,"))})
    for name in sums:
        rows.append({"path": name, "MB/token": "", "decode tok/s": "",
                     "GB/s read": round(statistics.median(measured[name]) * BANDWIDTH_ARRAY_BYTES / 1e9, 1),
                     "x 4 KiB pages (median of rounds)": "", "x per tensor (median of rounds)": ""})
    print_table(f"decode on the 1.17B Llama shape, medians of {args.rounds} rounds (process AnonHugePages after "
                f"the first model: {huge_mb:.0f} MB)", rows, tuple(rows[0]))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "huge_pages.csv", rows, tuple(rows[0]))
    scale = {name: (f"{name} (tok/s)", 1.0) for name in candidates}
    scale.update({name: (f"{name} (GB/s)", BANDWIDTH_ARRAY_BYTES / 1e9) for name in sums})
    per_round = [{"round": index + 1, **{scale[name][0]: round(values[index] * scale[name][1], 2)
                                         for name, values in measured.items()}} for index in range(args.rounds)]
    write_csv(args.out / "huge_pages_rounds.csv", per_round, tuple(per_round[0]))


if __name__ == "__main__":
    main()
