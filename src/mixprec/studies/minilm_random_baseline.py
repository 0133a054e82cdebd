"""How often does the task-metric search beat the best of 10 random policies? (issue 5)

The search study draws one set of 10 random policies; its comparison is one sample of a
random quantity. This study reads a finished search study's folder (its sensitivity
tables), draws ``draws`` random policies at the same budget, scores each on all STS-B test
pairs once, and then resamples groups of ``group`` policies from that pool: for each group,
the best policy chosen on the even pairs scores the odd pairs and the one chosen on the odd
pairs scores the even pairs (the same two-fold cross-fitting the task-metric search gets),
and the group's best by its all-pairs score is recorded too. The result is the share of
groups the cross-fitted task-metric search beats, both ways.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import track

from mixprec.analysis import (
    SensitivityTable,
    build_problem,
    measure_policy,
    random_choices,
    search,
    uniform_bytes,
)
from mixprec.errors import DataError, InputError
from mixprec.report.results import write_json
from mixprec.studies.minilm import load_model
from mixprec.studies.minilm_search import SearchStudyConfig, StsbScorer, cross_fitted


def best_of_groups(searched: np.ndarray, pool: Sequence[np.ndarray], gold: np.ndarray, group: int,
                   resamples: int, seed: int = 0) -> dict[str, Any]:
    """Compare one cross-fitted cosine vector with the best of ``group`` random policies.

    Args:
        searched: the searched policies' cross-fitted cosines over all pairs.
        pool: each random policy's cosines over all pairs.
        gold: the gold scores.
        group: policies per group (drawn without replacement from ``pool``).
        resamples: groups drawn.

    Returns the searched Spearman x100, and for the group's best chosen on the other half
    (cross-fitted) and chosen on all pairs: the median, 5% and 95% percentiles of its
    Spearman, and the share of groups the searched policy scores strictly above.
    """
    from scipy.stats import spearmanr

    if not 1 <= group <= len(pool) or resamples < 1:
        raise InputError(f"need 1 <= group <= {len(pool)} pooled policies and resamples >= 1, got group {group} "
                         f"and resamples {resamples}")
    if any(c.shape != gold.shape for c in (searched, *pool)):
        raise InputError(f"every cosine vector must cover the {gold.shape[0]} gold pairs")

    def score(cosine: np.ndarray, pairs: slice = slice(None)) -> float:
        return 100.0 * float(spearmanr(cosine[pairs], gold[pairs]).statistic)

    even, odd = slice(0, None, 2), slice(1, None, 2)
    on_even = np.array([score(c, even) for c in pool])
    on_odd = np.array([score(c, odd) for c in pool])
    on_all = np.array([score(c) for c in pool])
    rng = np.random.default_rng(seed)
    crossed, best_all = [], []
    for _ in range(resamples):
        members = rng.choice(len(pool), group, replace=False)
        fit_on_even, fit_on_odd = members[np.argmax(on_even[members])], members[np.argmax(on_odd[members])]
        crossed.append(score(cross_fitted(pool[fit_on_even], pool[fit_on_odd])))
        best_all.append(on_all[members].max())
    target = score(searched)

    def summary(values: list[float]) -> dict[str, float]:
        array = np.asarray(values)
        return {"median": round(float(np.median(array)), 3), "p5": round(float(np.percentile(array, 5)), 3),
                "p95": round(float(np.percentile(array, 95)), 3),
                "searched_beats_share": round(float((target > array).mean()), 4)}

    return {"searched": round(target, 3), "pool_median": round(float(np.median(on_all)), 3),
            "best_chosen_on_other_half": summary(crossed), "best_on_all_pairs": summary(best_all)}


def run(config: SearchStudyConfig, draws: int = 100, group: int = 10, resamples: int = 2000,
        console: Console | None = None) -> dict[str, Any]:
    """Read ``config.out``'s sensitivity tables (sqnr, task, task-odd), score the cross-fitted
    task-metric search and ``draws`` random policies at ``config.low_ratio`` x uniform int8
    bytes, compare (:func:`best_of_groups`), write ``random-baseline.json``."""
    console = console or Console(width=200)
    if draws < group:
        raise InputError(f"draws ({draws}) must be at least the group size ({group})")
    out = Path(config.out)
    missing = [name for name in ("sqnr", "task", "task-odd") if not (out / f"sensitivity-{name}.json").is_file()]
    if missing:
        raise DataError(f"{out} has no sensitivity-{missing[0]}.json: run `mixprec search-study --out {out}` first "
                        "(with the task metric; it writes the tables this baseline reads)")
    tables = {name: SensitivityTable.from_json(out / f"sensitivity-{name}.json")
              for name in ("sqnr", "task", "task-odd")}
    fp32, tokenizer = load_model(config.model)
    scorer = StsbScorer(tokenizer, config.data, fp32)
    budget = int(config.low_ratio * uniform_bytes(fp32, "int8"))
    problem = build_problem(fp32, tables["sqnr"])

    def cosines(choices: dict[str, str]) -> np.ndarray:
        measure_policy(fp32, "", choices, problem, scorer)
        return scorer.last_cosine

    searched = cross_fitted(cosines(search(fp32, tables["task"], budget_bytes=budget).choices),
                            cosines(search(fp32, tables["task-odd"], budget_bytes=budget).choices))
    rng = np.random.default_rng(config.seed)  # the study's own draws come first
    pool = [cosines(random_choices(problem, budget, rng)) for _ in track(range(draws), "random policies",
                                                                          console=console)]
    result = {"draws": draws, "group": group, "resamples": resamples, "budget_bytes": budget,
              "seed": config.seed} | best_of_groups(searched, pool, scorer.gold, group, resamples, config.seed)
    write_json(out / "random-baseline.json", result)
    console.print(result)
    return result
