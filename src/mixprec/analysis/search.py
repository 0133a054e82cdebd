"""Choose one precision per layer: least total sensitivity under a byte and/or latency budget.

The problem is an integer linear program (HAWQ-V3 style): a binary ``x[l, p]`` per layer
``l`` and option ``p`` (the table's candidates, plus ``fp32`` at zero cost unless left
out), exactly one option per layer,

    minimize    sum cost[l, p] x[l, p]
    subject to  fixed_bytes + sum bytes[l, p] x[l, p] <= budget_bytes
                base_s + sum seconds[l, p] x[l, p]    <= budget_latency_s

solved exactly by HiGHS through ``scipy.optimize.milp``. A tensor several layers hold
(a tied weight, e.g. a language model's head and its input embedding) counts once, and
only while one of its holders stays float32: a binary ``z[t] = OR_l x[l, fp32]`` carries
its bytes, so quantizing one holder does not free it. Holders that all take one precision
whose storage they can share (:func:`mixprec.tied_weights.saved_by_sharing`: e.g. ``w8gN``,
``bf16``) hold one quantized copy: a binary ``y = AND_l x[l, p]`` takes the second copy's
bytes off. Costs are the sensitivity
table's (additive: SQNR noise powers and second-order loss terms add across layers to
first order). ``fixed_bytes`` are the model's tensors outside the table's layers (norms,
and layers the table does not cover, which stay float32). Among options of equal cost
the smaller one wins (a tie-break weight far below any cost difference).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from mixprec.accounting import model_bytes, own_bytes, tensor_holders
from mixprec.analysis.latency import LatencyTable
from mixprec.analysis.sensitivity import SensitivityTable
from mixprec.errors import PolicyError
from mixprec.policy import Policy, quantizable_names
from mixprec.precision import build_empty, check_applicable, parse_precision
from mixprec.tied_weights import saved_by_sharing, tied_groups


@dataclass(frozen=True)
class Option:
    precision: str
    cost: float
    bytes: int
    seconds: float | None


@dataclass(frozen=True)
class SharedTensor:
    """A tensor two or more of the searched layers hold (a tied weight): in the quantized
    model while any of them stays float32, counted once."""

    bytes: int
    layers: tuple[str, ...]


@dataclass(frozen=True)
class MergedTensor:
    """Quantized storage the holders of a tied weight share when every one of them takes
    ``precision``: ``bytes`` is what all but the first would otherwise hold again (it is in
    each holder's option)."""

    bytes: int
    layers: tuple[str, ...]
    precision: str


@dataclass(frozen=True)
class SearchProblem:
    """Per-layer options (model order), the bytes no choice changes, the tensors the layers
    share (whose bytes are not in any option's) and the quantized storage tied layers share."""

    layers: dict[str, tuple[Option, ...]]
    fixed_bytes: int
    base_s: float | None
    shared: tuple[SharedTensor, ...] = ()
    merged: tuple[MergedTensor, ...] = ()

    def bytes_of(self, choices: dict[str, str]) -> int:
        """Whole-model bytes with ``choices`` (layers left out count as holding nothing)."""
        held = sum(t.bytes for t in self.shared if any(choices.get(layer) == "fp32" for layer in t.layers))
        saved = sum(t.bytes for t in self.merged if all(choices.get(layer) == t.precision for layer in t.layers))
        return self.fixed_bytes + held - saved + sum(self._option(layer, p).bytes for layer, p in choices.items())

    def seconds_of(self, choices: dict[str, str]) -> float | None:
        if self.base_s is None:
            return None
        return self.base_s + sum(self._option(layer, p).seconds or 0.0 for layer, p in choices.items())

    def cost_of(self, choices: dict[str, str]) -> float:
        return sum(self._option(layer, p).cost for layer, p in choices.items())

    def extreme(self, key: str, largest: bool) -> dict[str, str]:
        """Choices that make ``key`` (``"bytes"`` or ``"seconds"``) smallest or largest: layer
        by layer, or by the exact program when shared tensors tie layers' bytes together."""
        if key == "bytes" and (self.shared or self.merged):
            return _bytes_extreme(self, largest)
        pick = max if largest else min
        return {layer: pick(options, key=lambda o: getattr(o, key)).precision for layer, options in self.layers.items()}

    def limits(self, key: str) -> tuple[float, float]:
        """Smallest and largest whole-model ``key`` (``"bytes"`` or ``"seconds"``) the options give."""
        measure = self.bytes_of if key == "bytes" else self.seconds_of
        return measure(self.extreme(key, False)), measure(self.extreme(key, True))  # type: ignore[return-value]

    def _option(self, layer: str, precision: str) -> Option:
        for option in self.layers[layer]:
            if option.precision == precision:
                return option
        raise PolicyError(f"layer {layer!r} has no option {precision!r}; options: "
                          f"{[o.precision for o in self.layers[layer]]}")


@dataclass(frozen=True)
class SearchResult:
    """The chosen precision of every layer, as a policy, with what the model predicts."""

    policy: Policy
    choices: dict[str, str]
    predicted_cost: float
    predicted_bytes: int
    predicted_latency_s: float | None
    budget_bytes: int | None = None
    budget_latency_s: float | None = None
    notes: dict[str, float] = field(default_factory=dict)

    def to_toml(self) -> str:
        """The policy TOML, preceded by comments stating the budgets and predictions."""
        lines = [f"# mixprec search: predicted bytes {self.predicted_bytes}"
                 + (f" (budget {self.budget_bytes})" if self.budget_bytes is not None else "")]
        if self.predicted_latency_s is not None:
            lines.append(f"# predicted latency {self.predicted_latency_s * 1e3:.3f} ms"
                         + (f" (budget {self.budget_latency_s * 1e3:.3f} ms)"
                            if self.budget_latency_s is not None else ""))
        lines.append(f"# predicted total sensitivity {self.predicted_cost:.6g}")
        lines += [f"# {key} {value:.6g}" for key, value in self.notes.items()]
        return "\n".join(lines) + "\n" + self.policy.to_toml()


def policy_for(choices: dict[str, str]) -> Policy:
    """A policy naming every layer exactly (escaped full-match patterns); others stay fp32."""
    return Policy([(re.escape(layer), precision) for layer, precision in choices.items()], default="fp32")


def build_problem(model: nn.Module, table: SensitivityTable, latency: LatencyTable | None = None,
                  candidates: Sequence[str] | None = None, allow_fp32: bool = True) -> SearchProblem:
    """Gather each layer's options from the table (and latency table), checking they fit the model."""
    if not isinstance(table, SensitivityTable) or not table.rows:
        raise PolicyError("search needs a non-empty SensitivityTable (from mixprec.analysis.sensitivity)")
    names = quantizable_names(model)
    strangers = sorted({row.layer for row in table.rows} - names)
    if strangers:
        raise PolicyError(f"the sensitivity table names layers this {type(model).__name__} does not have as "
                          f"quantizable layers ({strangers[:3]}): was it measured on another model?")
    wanted = None if candidates is None else {parse_precision(c).name for c in candidates}
    if wanted is not None:
        missing = sorted(wanted - {row.precision for row in table.rows} - {"fp32"})
        if missing:
            raise PolicyError(f"candidates {missing} have no measurements in the sensitivity table")
    times = None if latency is None else {(r.layer, r.precision): r.seconds for r in latency.rows}
    table_layers = {row.layer for row in table.rows if wanted is None or row.precision in wanted}
    shared, shared_bytes = _shared_tensors(model, table_layers)
    layers: dict[str, list[Option]] = {}
    for row in table.rows:
        if wanted is not None and row.precision not in wanted:
            continue
        options = layers.setdefault(row.layer, [])
        fp32_bytes = row.bytes_fp32 - shared_bytes.get(row.layer, 0)
        if allow_fp32 and not options and row.precision != "fp32" and (wanted is None or "fp32" in wanted):
            options.append(Option("fp32", 0.0, fp32_bytes, _seconds(times, row.layer, "fp32")))
        if row.precision == "fp32":
            options[:] = [o for o in options if o.precision != "fp32"]
        after = fp32_bytes if row.precision == "fp32" else row.bytes_after
        options.append(Option(row.precision, row.cost, after, _seconds(times, row.layer, row.precision)))
    if not layers:
        raise PolicyError(f"no table row matches the candidates {sorted(wanted or ())}")
    order = list(dict(model.named_modules()))
    layers = dict(sorted(layers.items(), key=lambda item: order.index(item[0])))
    fixed = model_bytes(model) - sum(t.bytes for t in shared) - sum(
        own_bytes(model.get_submodule(name)) - shared_bytes.get(name, 0) for name in layers)
    keeps_fp32 = {layer for layer, options in layers.items() if any(o.precision == "fp32" for o in options)}
    options = {k: tuple(v) for k, v in layers.items()}
    return SearchProblem(options, fixed, None if latency is None else latency.base_s,
                         tuple(t for t in shared if keeps_fp32 & set(t.layers)), _merged_tensors(model, options))


def _merged_tensors(model: nn.Module, layers: dict[str, tuple[Option, ...]]) -> tuple[MergedTensor, ...]:
    """For each tied weight among ``layers`` and each precision all its holders may take, the
    bytes their quantized modules would share (empty builds; what quantize shares)."""
    merged = []
    for names in tied_groups((name, model.get_submodule(name)) for name in layers):
        common = set.intersection(*({o.precision for o in layers[name]} for name in names)) - {"fp32"}
        for precision in sorted(common):
            target = parse_precision(precision)
            saved = saved_by_sharing([build_empty(model.get_submodule(name), target) for name in names])
            if saved:
                merged.append(MergedTensor(saved, tuple(names), precision))
    return tuple(merged)


def _shared_tensors(model: nn.Module, layers: set[str]) -> tuple[list[SharedTensor], dict[str, int]]:
    """Tensors held by two or more of ``layers`` and by nothing else, and per layer the bytes
    of its own tensors that are shared with any other module (those outside ``layers`` stay
    in the fixed bytes)."""
    shared, shared_bytes = [], {}
    for size, holders in tensor_holders(model).values():
        if len(holders) < 2:
            continue
        for name in set(holders) & layers:
            shared_bytes[name] = shared_bytes.get(name, 0) + size
        if set(holders) <= layers:
            shared.append(SharedTensor(size, holders))
    return shared, shared_bytes


def uniform_bytes(model: nn.Module, precision: str) -> int:
    """Exact bytes of ``model`` with every quantizable layer that takes ``precision`` at it
    (the rest float32), without building it: the reference of budget ratios. A tied tensor
    is freed only when every module holding it is replaced, and its holders then share what
    their quantized storage has in common."""
    target = parse_precision(precision)
    if target.name == "fp32":
        return model_bytes(model)
    replaced: dict[str, nn.Module] = {}
    for name in quantizable_names(model):
        module = model.get_submodule(name)
        try:
            check_applicable(name, module, target)
        except PolicyError:
            continue
        replaced[name] = module
    freed = sum(size for size, holders in tensor_holders(model).values() if set(holders) <= replaced.keys())
    built = {name: build_empty(module, target) for name, module in replaced.items()}
    shared = sum(saved_by_sharing([built[name] for name in names]) for names in tied_groups(replaced.items()))
    return model_bytes(model) - freed - shared + sum(own_bytes(module) for module in built.values())


def _seconds(times: dict[tuple[str, str], float] | None, layer: str, precision: str) -> float | None:
    if times is None:
        return None
    if (layer, precision) not in times:
        raise PolicyError(f"the latency table has no time for layer {layer!r} at {precision!r}; measure it with "
                          "mixprec.analysis.measure_latency over the same candidates")
    return times[(layer, precision)]


def search(model: nn.Module, table: SensitivityTable, budget_bytes: int | None = None,
           budget_latency_s: float | None = None, latency: LatencyTable | None = None,
           candidates: Sequence[str] | None = None, allow_fp32: bool = True) -> SearchResult:
    """The least-sensitive policy whose predicted bytes (whole model) and/or latency fit.

    Args:
        table: per-layer costs (:func:`mixprec.analysis.sensitivity`), measured on ``model``.
        budget_bytes: most bytes the quantized model may hold (all its tensors).
        budget_latency_s: most predicted seconds per call on the latency table's batch.
        latency: per-layer latencies (:func:`mixprec.analysis.measure_latency`); needed
            for ``budget_latency_s`` and gives the prediction otherwise.
        candidates: restrict the options to these precisions (default: all in the table).
        allow_fp32: whether a layer may stay float32 (zero cost).

    A budget below the smallest model the options allow, or above the largest (nothing
    to trade), is refused with both limits in the message.
    """
    if budget_bytes is None and budget_latency_s is None:
        raise PolicyError("search needs a budget: budget_bytes and/or budget_latency_s")
    if budget_latency_s is not None and latency is None:
        raise PolicyError("a latency budget needs per-layer latencies: pass latency=measure_latency(...)")
    problem = build_problem(model, table, latency, candidates, allow_fp32)
    if budget_bytes is not None:
        _check_budget(problem, "bytes", budget_bytes)
    if budget_latency_s is not None:
        _check_budget(problem, "seconds", budget_latency_s)
    choices = solve(problem, budget_bytes, budget_latency_s)
    return SearchResult(policy_for(choices), choices, problem.cost_of(choices), problem.bytes_of(choices),
                        problem.seconds_of(choices), budget_bytes, budget_latency_s)


def _check_budget(problem: SearchProblem, key: str, budget: float) -> None:
    low, high = problem.limits(key)
    unit = "bytes" if key == "bytes" else "s"
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not np.isfinite(budget):
        raise PolicyError(f"the {key} budget must be a finite number, got {budget!r}")
    if budget < low:  # type: ignore[operator]
        raise PolicyError(f"the {key} budget {budget:.6g} {unit} is below the smallest model these candidates "
                          f"give ({low:.6g} {unit}, every layer at its smallest option): raise the budget or add a "
                          "smaller candidate (e.g. w4)")
    if budget > high:  # type: ignore[operator]
        raise PolicyError(f"the {key} budget {budget:.6g} {unit} is above the largest model these candidates give "
                          f"({high:.6g} {unit}, every layer at its largest option): nothing to trade, every layer "
                          "can take its most accurate option; lower the budget")


def solve(problem: SearchProblem, budget_bytes: float | None, budget_latency_s: float | None) -> dict[str, str]:
    """Exact ILP solution (scipy's HiGHS); raises PolicyError if no choice fits."""
    _, LinearConstraint, _ = _scipy_milp()
    flat, sizes, constraints = _program(problem)
    extra = [0.0] * (len(problem.shared) + len(problem.merged))
    costs = np.array([o.cost for _, o in flat] + extra, dtype=np.float64)
    scale = costs.max() if costs.max() > 0 else 1.0
    # Tie-break: 1e-9 of the largest cost spread over bytes, so equal-cost options pick the smaller.
    objective = costs / scale + 1e-9 * sizes / sizes.max()
    if budget_bytes is not None:
        constraints.append(LinearConstraint(sizes[None, :], -np.inf, budget_bytes - problem.fixed_bytes))
    if budget_latency_s is not None:
        seconds = np.array([o.seconds for _, o in flat] + extra, dtype=np.float64)
        constraints.append(LinearConstraint(seconds[None, :], -np.inf, budget_latency_s - (problem.base_s or 0.0)))
    choices = _minimize(objective, constraints, flat)
    if choices is None:
        raise PolicyError("no choice of precisions meets both budgets")
    return choices


def _bytes_extreme(problem: SearchProblem, largest: bool) -> dict[str, str]:
    """The choices with the fewest (or most) whole-model bytes, shared tensors counted once."""
    flat, sizes, constraints = _program(problem)
    choices = _minimize(-sizes if largest else sizes, constraints, flat)
    if choices is None:
        raise PolicyError("the search program has no solution: every layer needs at least one option")
    return choices


def _scipy_milp() -> tuple[Any, Any, Any]:
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        raise PolicyError("the search needs scipy: pip install 'mixprec[search]'") from None
    return Bounds, LinearConstraint, milp


def _program(problem: SearchProblem) -> tuple[list[tuple[str, Option]], np.ndarray, list[Any]]:
    """The program's variables (one binary per layer option, in ``flat`` order, then one per
    shared tensor, then one per merged tensor), their bytes, and the constraints every
    solution meets: one option per layer, each shared tensor's variable equal to the OR of
    its holders' fp32 options, each merged tensor's equal to the AND of its holders' options
    at its precision (its bytes negative: the copy it saves)."""
    _, LinearConstraint, _ = _scipy_milp()
    flat = [(layer, option) for layer, options in problem.layers.items() for option in options]
    first_merged = len(flat) + len(problem.shared)
    width = first_merged + len(problem.merged)
    sizes = np.array([o.bytes for _, o in flat] + [t.bytes for t in problem.shared]
                     + [-t.bytes for t in problem.merged], dtype=np.float64)
    one_hot = np.zeros((len(problem.layers), width))
    index_of = {layer: i for i, layer in enumerate(problem.layers)}
    for column, (layer, _) in enumerate(flat):
        one_hot[index_of[layer], column] = 1.0
    constraints = [LinearConstraint(one_hot, 1.0, 1.0)]
    rows, lower, upper = [], [], []  # lower <= row . x <= upper

    def add(coefficients: dict[int, float], low: float, high: float) -> None:
        row = np.zeros(width)
        for column, value in coefficients.items():
            row[column] += value
        rows.append(row)
        lower.append(low)
        upper.append(high)

    fp32_column = {layer: column for column, (layer, option) in enumerate(flat) if option.precision == "fp32"}
    for index, tensor in enumerate(problem.shared):
        z = len(flat) + index
        columns = [fp32_column[layer] for layer in tensor.layers if layer in fp32_column]
        for column in columns:
            add({z: 1.0, column: -1.0}, 0.0, np.inf)  # z >= x[l, fp32]
        add({z: 1.0, **dict.fromkeys(columns, -1.0)}, -np.inf, 0.0)  # z <= sum of x[l, fp32]
    column_of = {(layer, option.precision): column for column, (layer, option) in enumerate(flat)}
    for index, tensor in enumerate(problem.merged):
        y = first_merged + index
        columns = [column_of[(layer, tensor.precision)] for layer in tensor.layers]
        for column in columns:
            add({y: 1.0, column: -1.0}, -np.inf, 0.0)  # y <= x[l, p]
        add({y: 1.0, **dict.fromkeys(columns, -1.0)}, 1.0 - len(columns), np.inf)  # y >= sum of x[l, p] - (n - 1)
    if rows:
        constraints.append(LinearConstraint(np.array(rows), np.array(lower), np.array(upper)))
    return flat, sizes, constraints


def _minimize(objective: np.ndarray, constraints: list[Any], flat: list[tuple[str, Option]]) -> dict[str, str] | None:
    """Solve exactly (no relative gap); the chosen option of every layer, or None if infeasible."""
    Bounds, _, milp = _scipy_milp()
    result = milp(objective, constraints=constraints, integrality=np.ones(len(objective)), bounds=Bounds(0, 1),
                  options={"mip_rel_gap": 0.0})
    if result.status != 0 or result.x is None:
        return None
    return {layer: option.precision for (layer, option), x in zip(flat, result.x) if x > 0.5}
