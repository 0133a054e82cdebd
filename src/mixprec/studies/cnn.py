"""The CNN study: ResNet-8 on Fashion-MNIST and DS-CNN on spoken digits, where per-layer
precisions really differ.

For each model (:mod:`mixprec.studies.cnn_models`):

1. Train in float32 (seeded), fold every BatchNorm into its convolution
   (:func:`mixprec.fold_batchnorm`; the float accuracy is measured after folding).
2. Sensitivity of every layer at ``int8``, ``w4`` and ``bf16`` on training samples, never the
   test set (by default the KL divergence of the logits from the float model's, the quantity the
   refinement and the fidelity analysis measure for the whole model; ``sqnr``: the logits' SQNR),
   and per-layer latency at batch 64.
3. Policies, each quantized and scored on the whole test set: uniform ``bf16``, ``int8``,
   ``int8-static`` (calibrated on training samples), ``w4``; at each byte budget (a ratio of
   uniform ``int8``'s bytes) the ILP search, the same policy refined on measured fidelity
   (:func:`mixprec.analysis.refine`: neighbouring policies within the budget while the KL of the
   logits on the sensitivity samples falls), the NNCF-style heuristic and a pool of random
   policies; the search under uniform ``int8``'s predicted latency.
4. The random baseline, cross-fitted: groups of ``group`` policies are drawn from the pool; the
   best of a group is chosen on the even-numbered test samples and scored on the odd ones,
   and the other way round, so that every sample scores a choice that never saw it. The share
   of groups whose cross-fitted accuracy the searched (and the refined) policy beats is reported; and, beside it,
   what the search optimizes, fidelity to the float model on the training samples (KL of the
   logits), for every policy: where the searched policy ranks among the random ones, and how
   well fidelity predicts test accuracy among them (:func:`fidelity_ranks`).
5. Throughput at batch 1 and 64 (interleaved medians, one process), a Pareto plot, CSV/JSON.

With ``kws_test_speaker="all"`` (or several names, comma-separated) the DS-CNN is cross-validated
over speakers: each speaker is held out in turn, a model trained on the others and steps 1-4 run
on it (the random policies are the same layer choices in every fold); each policy's per-sample
scores are pooled over the folds (3,000 recordings instead of one speaker's 500) before the
comparisons of step 4. Step 5 is left out there.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from rich.console import Console
from torch import nn

from mixprec.analysis import (
    SearchProblem,
    build_problem,
    measure_latency,
    random_choices,
    refine,
    search,
    sensitivity,
    uniform_bytes,
    uniform_choices,
    weight_error_ranking,
)
from mixprec.analysis.search import policy_for
from mixprec.analysis.sensitivity import FORWARD_METRICS, mean_kl_divergence
from mixprec.batchnorm import fold_batchnorm
from mixprec.datasets.spoken_digits import speakers
from mixprec.errors import InputError
from mixprec.policy import Policy
from mixprec.quantize import quantize
from mixprec.report.plots import score_vs_cost
from mixprec.report.results import print_table, write_csv, write_json
from mixprec.studies.cnn_models import (
    DSCNN,
    NORMALIZATIONS,
    ResNet8,
    Task,
    fashion_mnist_task,
    per_sample_scores,
    seeded,
    spoken_digits_task,
    train,
)
from mixprec.timing import interleaved_medians

COLUMNS = ("label", "accuracy", "drop_vs_fp32", "test_nll", "train_kl", "bytes", "bytes_vs_int8", "predicted_ms_b64",
           "ms_b1", "ms_b64", "speedup_b64")
CANDIDATES = ("int8", "w4", "bf16")
#: ``kws_test_speaker`` value that cross-validates the DS-CNN over every speaker.
EVERY_SPEAKER = "all"


@dataclass(frozen=True)
class CnnStudyConfig:
    data: str | None = None
    out: str = "runs/cnn"
    models: tuple[str, ...] = ("resnet8", "dscnn")
    resnet_epochs: int = 3
    dscnn_epochs: int = 15
    #: The DS-CNN's test set: this speaker's 500 recordings, never heard in training (None: the
    #: dataset's own split, where float32 reaches 99.7% and no policy can differ; "all": every
    #: speaker held out in turn, one model trained per fold, the test samples pooled; several names
    #: separated by commas: those speakers in turn).
    kws_test_speaker: str | None = "lucas"
    #: How the DS-CNN's grids are standardized (:data:`~mixprec.studies.cnn_models.NORMALIZATIONS`).
    kws_normalization: str = "recording"
    seed: int = 0
    budget_ratios: tuple[float, ...] = (0.6, 0.7)
    random_policies: int = 30
    group: int = 10
    resamples: int = 2000
    sensitivity_samples: int = 256
    #: Per-layer cost the search adds up: a forward metric of the logits ("kl" or "sqnr").
    sensitivity_metric: str = "kl"
    calibration_samples: int = 512
    rounds: int = 5
    #: Most policies measured when refining each searched policy (0: no refinement).
    refine_evaluations: int = 60

    def check(self) -> None:
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown or not self.models:
            raise InputError(f"unknown models {unknown or '(none)'}; choose from {', '.join(MODELS)}")
        if min(self.resnet_epochs, self.dscnn_epochs, self.rounds, self.sensitivity_samples,
               self.calibration_samples, self.resamples) < 1:
            raise InputError("epochs, rounds, sample counts and resamples must all be >= 1")
        if self.kws_normalization not in NORMALIZATIONS:
            raise InputError(f"unknown DS-CNN normalization {self.kws_normalization!r}; choose "
                             f"{', '.join(NORMALIZATIONS)}")
        if self.sensitivity_metric not in FORWARD_METRICS:
            raise InputError(f"unknown sensitivity metric {self.sensitivity_metric!r}; choose "
                             f"{', '.join(FORWARD_METRICS)}")
        if self.refine_evaluations < 0:
            raise InputError(f"refine_evaluations must be >= 0 (0: no refinement), got {self.refine_evaluations}")
        if not 1 <= self.group <= self.random_policies:
            raise InputError(f"need 1 <= group ({self.group}) <= random_policies ({self.random_policies})")
        if not self.budget_ratios or not all(0 < r < 1 for r in self.budget_ratios):
            raise InputError(f"budget ratios must lie in (0, 1) of uniform int8's bytes, got {self.budget_ratios}")


def _fashion(config: CnnStudyConfig) -> Task:
    return fashion_mnist_task(None if config.data is None else str(Path(config.data) / "fashion-mnist"))


def _spoken_digits(config: CnnStudyConfig) -> Task:
    return spoken_digits_task(config.data, config.kws_test_speaker, config.kws_normalization)


#: Model name -> (what it is, its task, a fresh model, its training epochs from the config, batch size).
MODELS: dict[str, tuple[str, Callable[[CnnStudyConfig], Task], Callable[[], nn.Module],
                        Callable[[CnnStudyConfig], int], int]] = {
    "resnet8": ("ResNet-8", _fashion, ResNet8, lambda c: c.resnet_epochs, 128),
    "dscnn": ("DS-CNN keyword spotter (49x10 log-mel)", _spoken_digits, DSCNN, lambda c: c.dscnn_epochs, 64),
}


def cross_fitted_share(searched: np.ndarray, pool: list[np.ndarray], group: int, resamples: int, seed: int,
                       higher_is_better: bool = True) -> dict[str, float]:
    """How often the searched policy's mean score beats the cross-fitted best of ``group`` random
    policies (see module docstring). Arrays are per-sample scores over the test set
    (correctness, or cross-entropy with ``higher_is_better=False``)."""
    sign = 1.0 if higher_is_better else -1.0
    even, odd = slice(0, None, 2), slice(1, None, 2)
    on_even = np.array([sign * p[even].mean() for p in pool])
    on_odd = np.array([sign * p[odd].mean() for p in pool])
    rng = np.random.default_rng(seed)
    crossed = []
    for _ in range(resamples):
        members = rng.choice(len(pool), group, replace=False)
        fit_even, fit_odd = pool[members[np.argmax(on_even[members])]], pool[members[np.argmax(on_odd[members])]]
        combined = fit_even.copy()
        combined[even] = fit_odd[even]  # even samples score the policy chosen on the odd ones
        crossed.append(float(combined.mean()))
    values = np.array(crossed)
    target = float(searched.mean())
    beats = (target > values) if higher_is_better else (target < values)
    return {"searched": round(target, 5), "best_of_group_median": round(float(np.median(values)), 5),
            "searched_beats_share": round(float(beats.mean()), 4),
            "pool_median": round(float(np.median([p.mean() for p in pool])), 5)}


def fidelity_ranks(searched_kl: float, pool_kl: list[float], pool_scores: list[np.ndarray],
                   pool_losses: list[np.ndarray]) -> dict[str, float]:
    """Whether the search's objective, fidelity to the float model on training samples, says
    anything about the test set: the share of the random policies whose training KL the searched
    policy beats, and the Spearman correlation, over the random policies, of their training KL
    with their test accuracy (negative: fidelity predicts accuracy) and with their test NLL."""
    from scipy.stats import spearmanr

    kl = np.asarray(pool_kl)
    accuracy, nll = [s.mean() for s in pool_scores], [s.mean() for s in pool_losses]
    return {"searched_train_kl": round(searched_kl, 6), "pool_median_train_kl": round(float(np.median(kl)), 6),
            "searched_kl_below_share": round(float((searched_kl < kl).mean()), 4),
            "spearman_train_kl_test_accuracy": round(float(spearmanr(kl, accuracy).statistic), 3),
            "spearman_train_kl_test_nll": round(float(spearmanr(kl, nll).statistic), 3)}


class PolicyScore(NamedTuple):
    """One quantized model's scores: per-sample test correctness (0/1) and NLL (nats), its exact
    bytes, and its training KL (nats) from the float model."""

    hits: np.ndarray
    losses: np.ndarray
    bytes: int
    train_kl: float


class _Runner:
    """One model's part of the study: scores policies on the test set (and their fidelity, the KL
    divergence in nats of their logits from the float model's on training samples) and keeps the
    models."""

    def __init__(self, fp32: nn.Module, task: Task, problem: SearchProblem, calibration: list[torch.Tensor],
                 fidelity_inputs: torch.Tensor) -> None:
        self.fp32, self.task, self.problem, self.calibration = fp32, task, problem, calibration
        self.fidelity_inputs = fidelity_inputs
        with torch.no_grad():
            self.reference_logits = fp32(fidelity_inputs)
        self.models: dict[str, nn.Module] = {}

    def fidelity(self, model: nn.Module) -> float:
        """KL divergence (nats) of ``model``'s logits from the float model's on the fidelity inputs."""
        with torch.no_grad():
            return mean_kl_divergence([self.reference_logits], [model(self.fidelity_inputs)])

    def score(self, label: str, policy: Policy, keep: bool = False) -> PolicyScore:
        model = copy.deepcopy(self.fp32)
        static = "int8-static" in (policy.default, *(rule.precision for rule in policy.rules))
        report = quantize(model, policy, calibration=self.calibration if static else None)
        hits, losses = per_sample_scores(model, self.task.x_test, self.task.y_test)
        kl = self.fidelity(model)
        if keep:
            self.models[label] = model
        return PolicyScore(hits, losses, report.total_bytes, kl)


class _Scored(NamedTuple):
    """A policy scored in one fold (or pooled over folds): its scores, the policy and the program's
    predicted seconds at batch 64 (None where no choices were given)."""

    score: PolicyScore
    policy: Policy
    predicted_s: float | None


class _Fold(NamedTuple):
    """One trained model's part of the study (one test speaker's, where the DS-CNN is cross-validated)."""

    task: Task
    scored: dict[str, _Scored]
    #: Budget key ("0.6x") -> the random policies' scores, in the order of ``pool_choices``.
    pools: dict[str, list[PolicyScore]]
    pool_choices: dict[str, list[dict[str, str]]]
    refinements: dict[str, dict[str, Any]]
    models: dict[str, nn.Module]
    int8_bytes: int
    folded: list[dict[str, Any]]
    train_seconds: float


def _run_fold(name: str, config: CnnStudyConfig, task: Task,
              pool_choices: dict[str, list[dict[str, str]]] | None) -> _Fold:
    """Train one model on ``task`` and score every policy on its test set. ``pool_choices``: the
    random policies of each budget (the same layer choices in every fold); None draws them."""
    _, _, make_model, epochs_of, batch_size = MODELS[name]
    started = time.perf_counter()
    fp32 = train(seeded(make_model, config.seed), task, epochs_of(config), config.seed, batch_size)
    train_seconds = time.perf_counter() - started
    folds = fold_batchnorm(fp32)
    pick = torch.randperm(len(task.x_train), generator=torch.Generator().manual_seed(config.seed + 1))
    sample = task.x_train[pick[: config.sensitivity_samples]]
    calibration = list(task.x_train[pick[: config.calibration_samples]].split(128))
    table = sensitivity(fp32, list(sample.split(128)), CANDIDATES, metric=config.sensitivity_metric, progress=False)
    latency = measure_latency(fp32, task.x_test[:64], CANDIDATES, rounds=config.rounds, progress=False)
    problem = build_problem(fp32, table, latency)
    runner = _Runner(fp32, task, problem, calibration, sample)
    int8_bytes = uniform_bytes(fp32, "int8")
    scored: dict[str, _Scored] = {}

    def add(label: str, policy: Policy, choices: dict[str, str] | None = None, keep: bool = True) -> None:
        scored[label] = _Scored(runner.score(label, policy, keep), policy,
                                problem.seconds_of(choices) if choices is not None else None)

    add("fp32", Policy(default="fp32"), uniform_choices(problem, "fp32"))
    for precision in ("bf16", "int8", "int8-static", "w4"):
        add(precision, Policy(default=precision),
            None if precision == "int8-static" else uniform_choices(problem, precision))
    pools, refinements = {}, {}
    drawn: dict[str, list[dict[str, str]]] = {}
    rng = np.random.default_rng(config.seed)
    for ratio in config.budget_ratios:
        key, budget = f"{ratio:g}x", int(ratio * int8_bytes)
        result = search(fp32, table, budget_bytes=budget, latency=latency)
        add(f"searched {key} int8 bytes", result.policy, result.choices)
        heuristic = weight_error_ranking(fp32, problem, budget)
        add(f"NNCF-style {key}", policy_for(heuristic), heuristic, keep=False)
        if config.refine_evaluations:
            refined = refine(fp32, problem, result.choices, budget, runner.fidelity, config.refine_evaluations)
            add(f"refined {key} int8 bytes", policy_for(refined.choices), refined.choices)
            refinements[key] = {"evaluations": refined.evaluations, "steps": len(refined.step_costs),
                                "train_kl_start": round(refined.start_cost, 6),
                                "train_kl": round(refined.cost, 6), "exhausted": refined.exhausted}
        drawn[key] = (pool_choices[key] if pool_choices is not None else
                      [random_choices(problem, budget, rng) for _ in range(config.random_policies)])
        pools[key] = [runner.score("random", policy_for(choices)) for choices in drawn[key]]
    by_latency = search(fp32, table, budget_latency_s=problem.seconds_of(uniform_choices(problem, "int8")),
                        latency=latency)
    add("searched, int8 latency", by_latency.policy, by_latency.choices)
    return _Fold(task, scored, pools, drawn, refinements, runner.models, int8_bytes,
                 [asdict(f) for f in folds.folds], train_seconds)


def _pooled(scores: list[PolicyScore]) -> PolicyScore:
    """One policy's scores over several folds: the test samples of every fold in order, the largest
    bytes (the policies of a label may differ between folds) and the mean training KL."""
    return PolicyScore(np.concatenate([s.hits for s in scores]), np.concatenate([s.losses for s in scores]),
                       max(s.bytes for s in scores), float(np.mean([s.train_kl for s in scores])))


def _comparisons(config: CnnStudyConfig, scored: dict[str, PolicyScore], pools: dict[str, list[PolicyScore]],
                 int8_bytes: int) -> dict[str, dict[str, Any]]:
    """The searched (and refined) policy of each budget against the cross-fitted random best."""
    comparisons = {}
    for ratio in config.budget_ratios:
        key, pool = f"{ratio:g}x", pools[f"{ratio:g}x"]
        for kind in ("searched", "refined"):
            contender = scored.get(f"{kind} {key} int8 bytes")
            if contender is None:
                continue
            comparisons[key if kind == "searched" else f"{key} {kind}"] = {
                "budget_bytes": int(ratio * int8_bytes),
                "accuracy": cross_fitted_share(contender.hits, [p.hits for p in pool], config.group,
                                               config.resamples, config.seed),
                "test_nll": cross_fitted_share(contender.losses, [p.losses for p in pool], config.group,
                                               config.resamples, config.seed, higher_is_better=False),
                "fidelity": fidelity_ranks(contender.train_kl, [p.train_kl for p in pool], [p.hits for p in pool],
                                           [p.losses for p in pool])}
    return comparisons


def _test_speakers(config: CnnStudyConfig) -> list[str]:
    """The DS-CNN's test speakers named by ``kws_test_speaker`` (none for the dataset's own split)."""
    held_out = config.kws_test_speaker or ""
    if held_out == EVERY_SPEAKER:
        return speakers(config.data)
    return held_out.split(",") if held_out else []


def _tasks(name: str, config: CnnStudyConfig) -> list[Task]:
    """The model's task; for the DS-CNN with several test speakers (``"all"`` or a comma-separated
    list), one task per speaker held out."""
    names = _test_speakers(config) if name == "dscnn" else []
    if len(names) > 1:
        return [spoken_digits_task(config.data, speaker, config.kws_normalization) for speaker in names]
    return [MODELS[name][1](config)]


def run_model(name: str, config: CnnStudyConfig, out: Path, console: Console) -> dict[str, Any]:
    """The study for one model; writes ``{name}-results.csv/.json`` and ``{name}-pareto.png``.

    Over several folds (every speaker held out in turn) each label's test samples are pooled (the
    searched policies are each fold's own; the random ones are the same choices in every fold),
    and the models are not timed (the single-speaker run and ``benchmarks/cnn.py`` time them)."""
    title, _, _, epochs_of, _ = MODELS[name]
    folds: list[_Fold] = []
    for task in _tasks(name, config):
        folds.append(_run_fold(name, config, task, folds[0].pool_choices if folds else None))
    labels = list(folds[0].scored)
    scored = {label: _pooled([f.scored[label].score for f in folds]) for label in labels}
    pools = {key: [_pooled([f.pools[key][i] for f in folds]) for i in range(config.random_policies)]
             for key in folds[0].pools}
    int8_bytes = folds[0].int8_bytes
    comparisons = _comparisons(config, scored, pools, int8_bytes)
    rows = {}
    for label, score in scored.items():
        predicted = [f.scored[label].predicted_s for f in folds]
        rows[label] = {"label": label, "accuracy": round(100.0 * float(score.hits.mean()), 2),
                       "test_nll": round(float(score.losses.mean()), 5), "bytes": score.bytes,
                       "bytes_vs_int8": round(score.bytes / int8_bytes, 3), "train_kl": round(score.train_kl, 6),
                       "predicted_ms_b64": None if None in predicted else round(float(np.mean(predicted)) * 1e3, 3)}
    timed: dict[str, dict[str, float]] = {"b1": {}, "b64": {}}
    if len(folds) == 1:
        models, x_test = folds[0].models, folds[0].task.x_test
        with torch.no_grad():
            for batch, key in ((64, "b64"), (1, "b1")):
                timed[key] = interleaved_medians({k: (lambda m=m, x=x_test[:batch]: m(x)) for k, m in models.items()},
                                                 config.rounds)
    b1, b64 = timed["b1"], timed["b64"]
    fp32_accuracy = rows["fp32"]["accuracy"]
    for label, row in rows.items():
        row["drop_vs_fp32"] = round(fp32_accuracy - row["accuracy"], 2)
        row["ms_b1"] = round(b1[label] * 1e3, 3) if label in b1 else None
        row["ms_b64"] = round(b64[label] * 1e3, 3) if label in b64 else None
        row["speedup_b64"] = round(b64["fp32"] / b64[label], 2) if label in b64 else None
    results = list(rows.values())
    task_name = (folds[0].task.name if len(folds) == 1 else
                 f"{len(folds)} folds: {', '.join(f.task.name for f in folds)}")
    print_table(f"{title}, {task_name}: {epochs_of(config)} epochs (seed {config.seed}), "
                f"{torch.get_num_threads()} threads", results, COLUMNS, console)
    console.print(comparisons)
    refinements = folds[0].refinements if len(folds) == 1 else [f.refinements for f in folds]
    console.print({"refinements": refinements})
    write_csv(out / f"{name}-results.csv", results, COLUMNS)
    payload = {"model": title, "task": task_name, "config": asdict(config), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "train_seconds": round(sum(f.train_seconds for f in folds), 1),
               "folded": folds[0].folded, "int8_bytes": int8_bytes, "results": results,
               "random_baseline": comparisons, "refinements": refinements,
               "policies": {label: s.policy.to_dict() for label, s in folds[0].scored.items()},
               "random_policies": folds[0].pool_choices}
    if len(folds) > 1:
        payload["folds"] = [{"task": f.task.name, "test_samples": len(f.task.y_test),
                             "accuracy": {label: round(100.0 * float(s.score.hits.mean()), 2)
                                          for label, s in f.scored.items()},
                             "policies": {label: s.policy.to_dict() for label, s in f.scored.items()}}
                            for f in folds]
    write_json(out / f"{name}-results.json", payload)
    searched_points = [(r["bytes"], r["predicted_ms_b64"], r["accuracy"]) for r in results
                       if r["label"].startswith("searched") and "latency" not in r["label"]]
    marked = [(r["label"], r["bytes"], r["predicted_ms_b64"], r["accuracy"]) for r in results
              if not r["label"].startswith("searched ")]
    score_vs_cost(out / f"{name}-pareto.png", searched_points, marked, f"{title}: test accuracy vs cost",
                  "test accuracy (%)")
    return payload


def _check_test_speakers(config: CnnStudyConfig) -> None:
    """Refuse unknown or repeated DS-CNN test speakers before any model trains."""
    if "dscnn" not in config.models or config.kws_test_speaker in (None, "", EVERY_SPEAKER):
        return
    names, known = _test_speakers(config), speakers(config.data)
    unknown = [n for n in names if n not in known]
    if unknown or len(set(names)) < len(names):
        raise InputError(f"DS-CNN test speakers {config.kws_test_speaker!r}: "
                         f"{'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'a name repeats'}; "
                         f"name one or more of {', '.join(known)}, or 'all'")


def run(config: CnnStudyConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the study for each model of ``config``; returns each model's payload."""
    config.check()
    _check_test_speakers(config)
    console = console or Console(width=200)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    return {name: run_model(name, config, out, console) for name in config.models}
