"""Device-machine checks (``tools/device/run.sh``), one JSON line each.

1. What the native build sees on that CPU (torch version, CPU flags, whether fp16/bf16 run natively).
2. Every quantized precision refuses ``model.cuda()`` and CUDA inputs with a message (a real GPU).
3. compressed-tensors folders written by mixprec, read by transformers onto the GPU (``device_map="cuda"``):
   the largest absolute logit gap to mixprec on the CPU, beside mixprec's own gap to the float model.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

import mixprec
from mixprec import Policy
from mixprec.kernels import cpu, native

PRECISIONS = ("int8", "int8-asym", "w8", "w8g32", "w4g32", "w4a8g32", "bf16", "fp16")
FOLDERS = {
    "w8 weights": [(r"model\.layers\..*", "w8")],
    "w4g32 weights": [(r"model\.layers\..*", "w4g32")],
    "mixed int8/w8g32/w4a8g32/w4g32": [(r".*self_attn\.(q|k|v)_proj", "int8"), (r".*self_attn\.o_proj", "w8g32"),
                                       (r".*mlp\.(gate|up)_proj", "w4a8g32"), (r".*mlp\.down_proj", "w4g32")],
}


def report(row: dict[str, object]) -> None:
    print(json.dumps(row), flush=True)


def refusal(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001  # the message is the finding
        return f"{type(exc).__name__}: {exc}"[:200]
    return "accepted"


def build_report() -> None:
    started = time.perf_counter()
    error = native.load_error()
    report({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "native_load_error": error, "native_build_s": round(time.perf_counter() - started, 1),
            "cpu_flags": sorted(f for f in cpu.cpu_flags() if "avx512" in f or "amx" in f or "vnni" in f),
            "half_slow_path": {fmt: cpu.half_slow_path(fmt) for fmt in ("fp16", "bf16")}})


def refusals() -> None:
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128)).eval()
    x = torch.randn(8, 256)
    for precision in PRECISIONS:
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128)).eval()
        model.load_state_dict(reference.state_dict())
        mixprec.quantize(model, Policy(default=precision))
        with torch.no_grad():
            error = float((model(x) - reference(x)).norm() / reference(x).norm())
            report({"precision": precision, "relative_error_vs_fp32": error, ".cuda()": refusal(model.cuda),
                    "cuda input": refusal(lambda m=model: m(x.cuda()))})


def tiny_lm() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def compressed_tensors_on_the_gpu() -> None:
    import transformers

    ids = torch.tensor([[1, 5, 9, 200, 33, 7, 64, 3]])
    for label, rules in FOLDERS.items():
        model = tiny_lm()
        mixprec.quantize(model, Policy(rules))
        folder = mixprec.export(model, Path(tempfile.mkdtemp()) / "ct", format="compressed-tensors")
        row: dict[str, object] = {"folder": label}
        try:
            gpu = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cuda")
            with torch.no_grad():
                theirs = gpu.eval()(ids.cuda()).logits.cpu()
                ours, float_logits = model(ids).logits, tiny_lm()(ids).logits
            row.update(max_abs_gpu_vs_mixprec=float((theirs - ours).abs().max()),
                       max_abs_mixprec_vs_float=float((ours - float_logits).abs().max()))
        except Exception as exc:  # noqa: BLE001  # the failure is the finding
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        report(row)


if __name__ == "__main__":
    build_report()
    refusals()
    compressed_tensors_on_the_gpu()
