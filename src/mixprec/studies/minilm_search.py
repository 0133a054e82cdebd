"""The search study (issue 5) on all-MiniLM-L6-v2, scored by STS-B test Spearman x100.

1. Sensitivity of every layer at each candidate on SST-2 training phrases (never the
   evaluation data): forward SQNR of the pooled sentence embedding, the distortion of the
   phrases' pairwise cosine similarities (the quantity STS-B scores), Hessian trace
   (Hutchinson) and Fisher of a sentiment probe's cross-entropy (a logistic-regression
   head fitted on the float model's embeddings of other SST-2 training phrases).
2. Per-layer latency of each candidate at batch 32 (STS-B sentences), and the additive
   latency model.
3. Policies, each applied and scored on all STS-B test pairs: uniform precisions; the
   search at the bytes of uniform ``int8``; at ``low_ratio`` x those bytes the search
   (each metric), the NNCF-style heuristic (int4 for the layers with the least int4
   weight error, int8 for the rest) and ``random_policies`` random policies; the search
   under a latency budget (uniform ``int8``'s predicted latency).
4. Predicted against measured latency (interleaved medians at batch 32).
5. A Pareto sweep over byte budgets (CSV, PNG).
6. The accuracy-constrained mode: bisection on the even-numbered STS-B pairs with a
   ``max_drop`` bound, then the chosen policy scored on the odd-numbered pairs it never saw.
7. With the task metric (each layer's Spearman drop on one half of the pairs), two-fold
   cross-fitting: the search and the choice of the best random policy are made on each half
   and scored on the other, so every pair scores a choice that never saw it.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn

from mixprec.analysis import (
    Measured,
    SensitivityTable,
    build_problem,
    measure_latency,
    measure_policy,
    pareto_sweep,
    policy_for,
    random_choices,
    search,
    search_max_drop,
    sensitivity,
    uniform_bytes,
    uniform_choices,
    weight_error_ranking,
)
from mixprec.datasets.text_tasks import load_sst2, load_stsb_test
from mixprec.errors import DataError, InputError
from mixprec.io_utils import write_text_atomic
from mixprec.quantize import quantize
from mixprec.report.plots import score_vs_cost
from mixprec.report.results import print_table, write_csv, write_json
from mixprec.studies.minilm import embed, load_model, pooled, tokenize
from mixprec.timing import interleaved_medians

COLUMNS = ("label", "budget_bytes", "predicted_bytes", "measured_bytes", "bytes_vs_int8", "stsb_spearman",
           "embedding_sqnr_db", "predicted_ms", "measured_ms", "latency_error_pct")
METRIC_NAMES = ("sqnr", "cosine", "hessian", "fisher")
BATCH = 16


@dataclass(frozen=True)
class SearchStudyConfig:
    data: str | None = None
    out: str = "runs/minilm-search"
    model: str | None = None
    candidates: tuple[str, ...] = ("int8", "w4", "bf16")
    sensitivity_phrases: int = 128
    probe_phrases: int = 2000
    hutchinson_samples: int = 8
    random_policies: int = 10
    low_ratio: float = 0.6
    sweep_points: int = 8
    max_drop: float = 0.3
    #: Also search with a task metric: each layer's STS-B Spearman drop on the even-numbered
    #: pairs, and again on the odd-numbered ones (about 10 minutes each here); each half's
    #: policies are judged on the other half (two-fold cross-fitting).
    task_metric: bool = True
    rounds: int = 7
    seed: int = 0


def _probe(model: nn.Module, tokenizer: object, sentences: Sequence[str], labels: Sequence[int]) -> nn.Linear:
    """A logistic-regression sentiment head (scikit-learn) on the float model's embeddings, as nn.Linear."""
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(max_iter=2000).fit(embed(model, tokenizer, sentences).numpy(), np.asarray(labels))
    head = nn.Linear(fit.coef_.shape[1], 2)
    with torch.no_grad():  # binary: logits (0, z) give the same softmax as scikit-learn's sigmoid(z)
        head.weight.copy_(torch.cat([torch.zeros_like(torch.tensor(fit.coef_)), torch.tensor(fit.coef_)]))
        head.bias.copy_(torch.tensor([0.0, float(fit.intercept_[0])]))
    return head.requires_grad_(False)


def _row(measured: Measured, int8_bytes: int, sqnr_db: float) -> dict[str, Any]:
    return {
        "label": measured.label,
        "budget_bytes": "" if measured.budget is None else int(measured.budget),
        "predicted_bytes": measured.predicted_bytes,
        "measured_bytes": measured.measured_bytes,
        "bytes_vs_int8": round(measured.measured_bytes / int8_bytes, 4),
        "stsb_spearman": round(measured.score, 2),
        "embedding_sqnr_db": round(sqnr_db, 2),
        "predicted_ms": round((measured.predicted_latency_s or 0.0) * 1e3, 2),
        "measured_ms": "",
        "latency_error_pct": "",
    }


@dataclass
class SentenceTask:
    """The float model, its tokenizer, the analysis batches (SST-2 training phrases) and the
    probe loss the curvature metrics differentiate."""

    model: nn.Module
    tokenizer: object
    encoded: list[dict[str, Tensor]]
    labelled: list[tuple[dict[str, Tensor], Tensor]]
    head: nn.Linear

    def loss(self, model: nn.Module, batch: tuple[dict[str, Tensor], Tensor]) -> Tensor:
        """Cross-entropy of the sentiment probe on the pooled embedding (mean over the batch)."""
        return F.cross_entropy(self.head(pooled(model, batch[0])), batch[1])

    def sensitivity(self, metric: str, candidates: Sequence[str], samples: int = 8, seed: int = 0) -> SensitivityTable:
        """``metric`` is ``sqnr``/``kl`` (of the pooled embedding), ``cosine`` (distortion of the
        phrases' pairwise cosine similarities, :func:`cosine_distortion`) or ``hessian``/``fisher``
        (of the probe loss)."""
        if metric in ("hessian", "fisher"):
            return sensitivity(self.model, self.labelled, candidates, metric, loss=self.loss, samples=samples,
                               seed=seed)
        if metric == "cosine":
            return sensitivity(self.model, self.encoded, candidates, cosine_distortion, forward=pooled)
        return sensitivity(self.model, self.encoded, candidates, metric, forward=pooled)


def sentence_task(data: str | None = None, model: str | None = None, phrases: int = 128, probe_phrases: int = 2000,
                  seed: int = 0) -> SentenceTask:
    """Load the model and draw ``phrases`` analysis phrases and ``probe_phrases`` other phrases
    (for the probe) from SST-2 train with ``seed``."""
    sst2 = load_sst2("train", data)
    if phrases < 1 or probe_phrases < 2 or phrases + probe_phrases > len(sst2.labels):
        raise DataError(f"need 1 <= phrases and 2 <= probe_phrases with phrases + probe_phrases <= "
                        f"{len(sst2.labels)}, got {phrases} and {probe_phrases}")
    order = np.random.default_rng(seed).permutation(len(sst2.labels))
    analysis_ids, probe_ids = order[:phrases], order[phrases:phrases + probe_phrases]
    fp32, tokenizer = load_model(model)
    texts = [sst2.sentences[i] for i in analysis_ids]
    labels = torch.tensor([sst2.labels[i] for i in analysis_ids])
    starts = range(0, len(texts), BATCH)
    encoded = [tokenize(tokenizer, texts[i:i + BATCH]) for i in starts]
    labelled = [(batch, labels[i:i + BATCH]) for batch, i in zip(encoded, starts)]
    head = _probe(fp32, tokenizer, [sst2.sentences[i] for i in probe_ids], [sst2.labels[i] for i in probe_ids])
    return SentenceTask(fp32, tokenizer, encoded, labelled, head)


class StsbScorer:
    """STS-B test scoring of a sentence-embedding model. ``scorer(model, pairs)`` returns the
    Spearman correlation x100 of embedding cosines with the gold scores over ``pairs`` (a
    slice; default all 1379), and records every pair's cosine (``last_cosine``) and the
    SQNR in dB of all its sentence embeddings against the reference model's (``last_sqnr_db``), and
    the embeddings themselves (``last_embeddings``, ``[2, pairs, hidden]``: first and second sentences)."""

    def __init__(self, tokenizer: object, data: str | None, reference: nn.Module) -> None:
        stsb = load_stsb_test(data)
        self.tokenizer, self.first, self.second = tokenizer, stsb.first, stsb.second
        self.gold = np.asarray(stsb.scores, dtype=np.float64)
        self.reference = self._embeddings(reference)
        self.last_cosine = np.empty(0)
        self.last_sqnr_db = math.nan
        self.last_embeddings = torch.empty(0)

    def _embeddings(self, model: nn.Module, pairs: slice = slice(None)) -> Tensor:
        return torch.stack([embed(model, self.tokenizer, self.first[pairs]),
                            embed(model, self.tokenizer, self.second[pairs])])

    def spearman(self, cosine: np.ndarray, pairs: slice = slice(None)) -> float:
        """Spearman x100 of recorded all-pair cosines against the gold scores over ``pairs``."""
        return 100.0 * self._spearmanr(cosine[pairs], self.gold[pairs])

    def __call__(self, model: nn.Module, pairs: slice = slice(None)) -> float:
        """Spearman x100 over ``pairs``; only those pairs' sentences are embedded, and
        ``last_cosine`` / ``last_sqnr_db`` then cover those pairs only."""
        embeddings, reference = self._embeddings(model, pairs), self.reference[:, pairs]
        noise = float((embeddings.double() - reference.double()).pow(2).sum())
        self.last_sqnr_db = 10 * math.log10(float(reference.double().pow(2).sum()) / noise) if noise else math.inf
        self.last_cosine = (embeddings[0] * embeddings[1]).sum(1).double().numpy()
        self.last_embeddings = embeddings
        return 100.0 * float(self._spearmanr(self.last_cosine, self.gold[pairs]))

    @staticmethod
    def _spearmanr(cosine: np.ndarray, gold: np.ndarray) -> float:
        from scipy.stats import spearmanr

        return float(spearmanr(cosine, gold).statistic)


def cosine_distortion(reference: Sequence[Tensor], outputs: Sequence[Tensor]) -> float:
    """Sensitivity metric shaped like the task (STS-B scores pairs by cosine similarity): the
    mean squared change, x 10^4, of the cosine similarity between every two sentences of the
    analysis phrases (all batches together)."""
    def similarities(embeddings: Sequence[Tensor]) -> Tensor:
        unit = F.normalize(torch.cat([e.double() for e in embeddings]), dim=-1)
        return unit @ unit.T

    return float(1e4 * (similarities(outputs) - similarities(reference)).pow(2).mean())


def spearman_drop(reference: Sequence[Tensor], outputs: Sequence[Tensor]) -> float:
    """Sensitivity metric: Spearman points lost (forward returns the score as a 1-element tensor)."""
    return float(reference[0][0] - outputs[0][0])


def cross_fitted(fit_on_even: np.ndarray, fit_on_odd: np.ndarray) -> np.ndarray:
    """Two-fold cross-fitting over the STS-B pairs: every pair's cosine from the policy chosen
    on the other half (odd-numbered pairs from the one fitted on even pairs, even-numbered
    pairs from the one fitted on odd pairs), so all pairs score held-out choices."""
    if fit_on_even.shape != fit_on_odd.shape or fit_on_even.ndim != 1:
        raise InputError(f"need two cosine vectors over the same pairs, got shapes {fit_on_even.shape} and "
                         f"{fit_on_odd.shape}")
    combined = fit_on_even.copy()
    combined[0::2] = fit_on_odd[0::2]
    return combined


def paired_bootstrap(cosine_a: np.ndarray, cosine_b: np.ndarray, gold: np.ndarray, resamples: int = 1000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Spearman x100 of ``a`` minus that of ``b`` against ``gold``, and the 2.5% and 97.5%
    percentiles of that difference over ``resamples`` resamplings of the pairs (with
    replacement, the same pairs for both)."""
    from scipy.stats import spearmanr

    def difference(index: np.ndarray) -> float:
        return 100.0 * float(spearmanr(cosine_a[index], gold[index]).statistic
                             - spearmanr(cosine_b[index], gold[index]).statistic)

    rng = np.random.default_rng(seed)
    draws = [difference(rng.integers(0, len(gold), len(gold))) for _ in range(resamples)]
    return difference(np.arange(len(gold))), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def _time_policies(model: nn.Module, batch: dict[str, Tensor], rounds: int,
                   policies: dict[str, dict[str, str]]) -> dict[str, float]:
    """Median seconds per call of each policy (layer -> precision) on ``batch``, interleaved.
    Run right after the latency table, so prediction and measurement see the same machine."""
    models = {}
    for label, choices in policies.items():
        models[label] = copy.deepcopy(model)
        quantize(models[label], policy_for(choices))
    with torch.no_grad():
        return interleaved_medians({k: (lambda m=m: m(**batch)) for k, m in models.items()}, rounds)


def run(config: SearchStudyConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the study; write results.csv, pareto.csv/.png, sensitivity tables, policies and summary.json."""
    console = console or Console(width=200)
    if not 0 < config.low_ratio < 1 or config.random_policies < 1 or config.sweep_points < 2 or config.rounds < 1:
        raise InputError("low_ratio must be in (0, 1); random_policies, rounds >= 1; sweep_points >= 2")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    task = sentence_task(config.data, config.model, config.sensitivity_phrases, config.probe_phrases, config.seed)
    fp32, tokenizer = task.model, task.tokenizer
    stsb = load_stsb_test(config.data)
    tables: dict[str, SensitivityTable] = {}
    seconds: dict[str, float] = {}
    for metric in METRIC_NAMES:
        start = time.perf_counter()
        tables[metric] = task.sensitivity(metric, config.candidates, config.hutchinson_samples, config.seed)
        seconds[metric] = round(time.perf_counter() - start, 1)
        tables[metric].to_json(out / f"sensitivity-{metric}.json")
        tables[metric].to_csv(out / f"sensitivity-{metric}.csv")
        console.print(f"sensitivity ({metric}): {len(tables[metric].rows)} pairs in {seconds[metric]} s")
    batch32 = tokenize(tokenizer, stsb.first[:32])
    latency = measure_latency(fp32, batch32, config.candidates, rounds=config.rounds)
    latency.to_json(out / "latency.json")
    problem = build_problem(fp32, tables["sqnr"], latency)
    int8_bytes = uniform_bytes(fp32, "int8")
    low_budget = int(config.low_ratio * int8_bytes)
    int8_latency = problem.seconds_of(uniform_choices(problem, "int8")) or 0.0
    fast_label = f"searched sqnr, int8 latency ({int8_latency * 1e3:.1f} ms)"
    times = _time_policies(fp32, batch32, config.rounds, {
        **{f"uniform {p}": uniform_choices(problem, p) for p in ("fp32", *config.candidates)},
        "searched sqnr, int8 bytes": search(fp32, tables["sqnr"], budget_bytes=int8_bytes).choices,
        f"searched sqnr, {config.low_ratio}x int8 bytes": search(fp32, tables["sqnr"], budget_bytes=low_budget).choices,
        fast_label: search(fp32, tables["sqnr"], budget_latency_s=int8_latency, latency=latency).choices})

    scorer = StsbScorer(tokenizer, config.data, fp32)
    even, odd = slice(0, None, 2), slice(1, None, 2)
    if config.task_metric:
        for name, half in (("task", even), ("task-odd", odd)):
            start = time.perf_counter()
            tables[name] = sensitivity(fp32, [half], config.candidates, metric=spearman_drop,
                                       forward=lambda model, pairs: torch.tensor([scorer(model, pairs)]))
            seconds[name] = round(time.perf_counter() - start, 1)
            tables[name].to_json(out / f"sensitivity-{name}.json")
            console.print(f"sensitivity ({name}: STS-B {'even' if half == even else 'odd'} pairs): "
                          f"{len(tables[name].rows)} pairs in {seconds[name]} s")
    metrics = [*METRIC_NAMES, *(["task"] if config.task_metric else [])]
    measured: list[Measured] = []
    detail: dict[str, tuple[float, np.ndarray]] = {}

    def measure(label: str, choices: dict[str, str], budget: float | None = None) -> Measured:
        point = measure_policy(fp32, label, choices, problem, scorer, budget)
        measured.append(point)
        detail[label] = (scorer.last_sqnr_db, scorer.last_cosine)
        return point

    def searched(metric: str, label: str, **budget: Any) -> Measured:
        result = search(fp32, tables[metric], latency=latency, **budget)
        write_text_atomic(out / f"policy-{re.sub(r'[^A-Za-z0-9.]+', '-', label).strip('-')}.toml", result.to_toml())
        return measure(label, result.choices, budget.get("budget_bytes"))

    uniform = {p: measure(f"uniform {p}", uniform_choices(problem, p)) for p in ("fp32", *config.candidates)}
    at_int8 = {m: searched(m, f"searched {m}, int8 bytes", budget_bytes=int8_bytes) for m in metrics}
    at_low = {m: searched(m, f"searched {m}, {config.low_ratio}x int8 bytes", budget_bytes=low_budget)
              for m in metrics}
    two_way = build_problem(fp32, tables["sqnr"], latency, candidates=["int8", "w4"], allow_fp32=False)
    nncf = measure(f"NNCF-style int4/int8, {config.low_ratio}x int8 bytes",
                   weight_error_ranking(fp32, two_way, low_budget), low_budget)
    rng = np.random.default_rng(config.seed)
    randoms = [measure(f"random {i}, {config.low_ratio}x int8 bytes", random_choices(problem, low_budget, rng),
                       low_budget) for i in range(config.random_policies)]
    searched("sqnr", fast_label, budget_latency_s=int8_latency)
    if config.task_metric:
        fit_on_odd = searched("task-odd", f"searched task (odd pairs), {config.low_ratio}x int8 bytes",
                              budget_bytes=low_budget)
    rows = [_row(point, int8_bytes, detail[point.label][0]) for point in measured]
    for row in rows:
        if row["label"] in times:
            row["measured_ms"] = round(times[row["label"]] * 1e3, 2)
            row["latency_error_pct"] = round(100 * (row["predicted_ms"] / row["measured_ms"] - 1), 1)

    low, high = problem.limits("bytes")
    swept: list[tuple[float, np.ndarray]] = []

    def recording(model: nn.Module) -> float:
        score = scorer(model)
        swept.append((scorer.last_sqnr_db, scorer.last_cosine))
        return score

    budgets = [int(b) for b in np.geomspace(low, high, config.sweep_points)]
    sweep = pareto_sweep(fp32, tables["sqnr"], recording, budgets, latency=latency)
    detail.update({point.label: record for point, record in zip(sweep, swept)})
    sweep_rows = [_row(point, int8_bytes, detail[point.label][0]) for point in sweep]
    write_csv(out / "pareto.csv", sweep_rows, COLUMNS)
    score_vs_cost(out / "pareto.png", [(p.predicted_bytes, (p.predicted_latency_s or 0) * 1e3, p.score) for p in sweep],
                  [(p.label, p.measured_bytes, (p.predicted_latency_s or 0) * 1e3, p.score) for p in uniform.values()],
                  "all-MiniLM-L6-v2: searched policies (SQNR sensitivity) vs uniform precisions",
                  "STS-B test Spearman x100")

    drop = search_max_drop(fp32, tables["sqnr"], lambda m: scorer(m, even), config.max_drop)
    chosen = copy.deepcopy(fp32)
    quantize(chosen, drop.best.policy)
    held_out = {"fp32": scorer(fp32, odd), "chosen": scorer(chosen, odd)}
    write_text_atomic(out / "policy-max-drop.toml", drop.best.policy.to_toml())

    best_random = max(randoms, key=lambda p: p.score)
    validated_random = max(randoms, key=lambda p: scorer.spearman(detail[p.label][1], even))
    held_out_protocol = {point.label: round(scorer.spearman(detail[point.label][1], odd), 2) for point in
                         (uniform["fp32"], uniform["int8"], uniform["w4"], *at_int8.values(), *at_low.values(),
                          nncf, validated_random)}
    pairs_all = slice(None)
    named = [(at_int8["sqnr"], uniform["int8"], pairs_all), (at_low["sqnr"], best_random, pairs_all),
             (at_low["sqnr"], nncf, pairs_all), (at_low["sqnr"], uniform["w4"], pairs_all),
             (best_random, uniform["w4"], pairs_all)]
    named += [(at_low["cosine"], best_random, pairs_all), (at_low["cosine"], nncf, pairs_all),
              (at_low["cosine"], at_low["sqnr"], pairs_all)]
    if config.task_metric:
        named += [(at_low["task"], validated_random, odd), (at_low["task"], nncf, odd),
                  (at_low["task"], at_low["sqnr"], odd)]
    cross_fit: dict[str, Any] | None = None
    if config.task_metric:
        random_for_even = max(randoms, key=lambda p: scorer.spearman(detail[p.label][1], odd))
        crossed = {
            "searched task": cross_fitted(detail[at_low["task"].label][1], detail[fit_on_odd.label][1]),
            "best of random": cross_fitted(detail[validated_random.label][1], detail[random_for_even.label][1]),
            "NNCF-style": detail[nncf.label][1], "searched sqnr": detail[at_low["sqnr"].label][1],
            "uniform w4": detail[uniform["w4"].label][1], "uniform fp32": detail[uniform["fp32"].label][1]}
        cross_fit = {"spearman": {k: round(scorer.spearman(v), 2) for k, v in crossed.items()}} | {
            f"searched task - {other}": dict(zip(("difference", "ci95_low", "ci95_high"), (round(v, 3) for v in (
                paired_bootstrap(crossed["searched task"], crossed[other], scorer.gold, seed=config.seed)))))
            for other in ("best of random", "NNCF-style", "searched sqnr", "uniform fp32")}
    comparisons = {
        f"{a.label} - {b.label}{'' if pairs == pairs_all else ' (odd pairs)'}": dict(zip(
            ("difference", "ci95_low", "ci95_high"),
            (round(v, 3) for v in paired_bootstrap(detail[a.label][1][pairs], detail[b.label][1][pairs],
                                                   scorer.gold[pairs], seed=config.seed))))
        for a, b, pairs in named
    }
    summary = {
        "config": asdict(config),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sensitivity_seconds": seconds,
        "int8_bytes": int8_bytes,
        "low_budget_bytes": low_budget,
        "at_int8_bytes": {m: p.score for m, p in at_int8.items()} | {"uniform int8": uniform["int8"].score},
        "at_low_budget": {m: p.score for m, p in at_low.items()} | {
            "nncf": nncf.score, "best random": best_random.score,
            "random scores": [round(p.score, 2) for p in randoms],
            "embedding sqnr dB": {"searched sqnr": detail[at_low["sqnr"].label][0],
                                  "searched cosine": detail[at_low["cosine"].label][0], "nncf": detail[nncf.label][0],
                                  "best of random by sqnr": max(detail[p.label][0] for p in randoms)}},
        "paired_bootstrap_spearman": comparisons,
        "odd_pairs_with_random_chosen_on_even_pairs": held_out_protocol,
        "cross_fitted_all_pairs": cross_fit,
        "latency_error_pct": {row["label"]: row["latency_error_pct"] for row in rows if row["label"] in times},
        "max_drop": {"bound": config.max_drop, "validation fp32": drop.reference_score,
                     "validation chosen": drop.best.score, "held-out fp32": held_out["fp32"],
                     "held-out chosen": held_out["chosen"], "bytes": drop.best.measured_bytes,
                     "bytes_vs_int8": round(drop.best.measured_bytes / int8_bytes, 4),
                     "trials": [(t.predicted_bytes, round(t.score, 2)) for t in drop.trials]},
    }
    print_table(f"all-MiniLM-L6-v2 search: STS-B test Spearman, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads", rows, COLUMNS, console)
    print_table("Pareto sweep (searched, SQNR sensitivity)", sweep_rows, COLUMNS, console)
    write_csv(out / "results.csv", rows, COLUMNS)
    write_json(out / "summary.json", summary)
    console.print(summary)
    console.print(f"wrote {out}/results.csv, pareto.csv, pareto.png, summary.json, sensitivity-*.json, policies")
    return summary
