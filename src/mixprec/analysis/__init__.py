"""Which layers tolerate which precision: sensitivity, per-layer latency, and the search
that allocates precisions under byte and latency budgets."""

from mixprec.analysis.baselines import random_choices, relative_weight_error, weight_error_ranking
from mixprec.analysis.evaluated import (
    DropSearch,
    Measured,
    measure_policy,
    pareto_sweep,
    search_max_drop,
    uniform_choices,
)
from mixprec.analysis.latency import LatencyRow, LatencyTable, measure_latency
from mixprec.analysis.refine import Refinement, refine
from mixprec.analysis.search import (
    SearchProblem,
    SearchResult,
    build_problem,
    policy_for,
    search,
    uniform_bytes,
)
from mixprec.analysis.sensitivity import METRICS, SensitivityRow, SensitivityTable, sensitivity, weight_perturbation

__all__ = [
    "METRICS", "DropSearch", "LatencyRow", "LatencyTable", "Measured", "Refinement", "SearchProblem", "SearchResult",
    "SensitivityRow", "SensitivityTable", "build_problem", "measure_latency", "measure_policy", "pareto_sweep",
    "policy_for", "random_choices", "refine", "relative_weight_error", "search", "search_max_drop", "sensitivity",
    "uniform_bytes", "uniform_choices", "weight_error_ranking", "weight_perturbation",
]
