"""Per-layer precision policies: ordered regular-expression rules over module names.

Each rule's pattern is matched with ``re.fullmatch`` against a module's fully qualified
name (as ``model.named_modules()`` gives it); the first matching rule wins; layers no
rule matches get ``default``. Rules apply to quantizable layers (``nn.Linear``,
``nn.Embedding``); every other module keeps float32 and is listed as such.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mixprec.accounting import model_bytes, modules_with_tensors, own_bytes
from mixprec.batchnorm import plan_merges, with_bias_template
from mixprec.errors import PolicyError
from mixprec.formats import all_finite
from mixprec.nn.conv_layout import is_conv
from mixprec.precision import INT8_GEMM_FAMILIES, Precision, build_empty, check_applicable, parse_precision, quantizable
from mixprec.quant_report import LayerReport, QuantReport


@dataclass(frozen=True)
class Rule:
    """``pattern`` (a regular expression, full match) -> ``precision`` name."""

    pattern: str
    precision: str


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one quantizable layer."""

    name: str
    module: nn.Module
    precision: Precision
    rule: str


class Policy:
    """Ordered rules mapping module names to precisions.

    Args:
        rules: ``(pattern, precision)`` pairs or :class:`Rule` objects, first match wins.
        default: precision of quantizable layers that no rule matches.
        allow_unused: if False (default), applying the policy fails when a rule decides
            no layer, which catches typos in patterns.
    """

    def __init__(self, rules: Iterable[Rule | tuple[str, str]] = (), default: str = "fp32",
                 allow_unused: bool = False) -> None:
        if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
            raise PolicyError(f"rules must be a list of (pattern, precision) pairs, got {type(rules).__name__}")
        parsed: list[Rule] = []
        compiled: list[re.Pattern[str]] = []
        for index, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                if not isinstance(rule, (tuple, list)) or len(rule) != 2:
                    raise PolicyError(f"rule {index} must be a (pattern, precision) pair, got {rule!r}")
                rule = Rule(*rule)
            if not isinstance(rule.pattern, str):
                raise PolicyError(f"rule {index}: pattern must be a string, got {rule.pattern!r}")
            try:
                compiled.append(re.compile(rule.pattern))
            except re.error as exc:
                raise PolicyError(f"rule {index} has an invalid regular expression {rule.pattern!r}: {exc}") from None
            parse_precision(rule.precision)
            parsed.append(rule)
        parse_precision(default)
        self.rules: tuple[Rule, ...] = tuple(parsed)
        self.default = default
        self.allow_unused = bool(allow_unused)
        self._compiled = tuple(compiled)

    def __repr__(self) -> str:
        rules = ", ".join(f"({r.pattern!r}, {r.precision!r})" for r in self.rules)
        return f"Policy([{rules}], default={self.default!r}, allow_unused={self.allow_unused})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and (self.rules, self.default, self.allow_unused) == (
            other.rules, other.default, other.allow_unused)

    def match(self, name: str) -> tuple[str, str]:
        """``(precision name, rule label)`` for a module name; the label is the pattern or ``default``."""
        for rule, regex in zip(self.rules, self._compiled):
            if regex.fullmatch(name):
                return rule.precision, rule.pattern
        return self.default, "default"

    def plan(self, model: nn.Module, check_values: bool = True) -> list[LayerPlan]:
        """Decide every quantizable layer; raise PolicyError before anything is changed.
        ``check_values=False`` skips the finite-weights check (for a model whose weights are
        not loaded yet, on the meta device)."""
        if not isinstance(model, nn.Module):
            raise PolicyError(f"policies apply to torch.nn.Module, got {type(model).__name__}")
        if quantizable(model):
            raise PolicyError(
                f"quantize() replaces submodules, and the model itself is a {type(model).__name__}; "
                "wrap it first, e.g. nn.Sequential(layer)"
            )
        names = quantizable_names(model)
        plans: list[LayerPlan] = []
        used: set[str] = set()
        for name, module in model.named_modules():
            if name not in names:
                continue
            precision_name, label = self.match(name)
            precision = parse_precision(precision_name)
            check_applicable(name, module, precision)
            if check_values and precision.family != "fp32" and not all(all_finite(t) for t in module.parameters()):
                raise PolicyError(f"layer {name!r} holds NaN or Inf weights; only finite weights can be quantized")
            used.add(label)
            plans.append(LayerPlan(name, module, precision, label))
        if not self.allow_unused:
            self._check_used(model, names, used)
        return plans

    def _check_used(self, model: nn.Module, names: set[str], used: set[str]) -> None:
        unused = [rule for rule in self.rules if rule.pattern not in used]
        if not unused:
            return
        all_names = [name for name, _ in model.named_modules() if name]
        problems = []
        for rule, regex in ((r, re.compile(r.pattern)) for r in unused):
            hits = [n for n in all_names if regex.fullmatch(n)]
            quantizable_hits = [n for n in hits if n in names]
            if quantizable_hits:
                why = f"every layer it matches ({quantizable_hits[0]!r}, ...) is taken by an earlier rule"
            elif hits:
                kinds = sorted({type(model.get_submodule(n)).__name__ for n in hits})
                why = f"it matches only modules mixprec does not quantize ({hits[0]!r}: {', '.join(kinds)})"
            else:
                why = "it matches no module"
            problems.append(f"rule {rule.pattern!r} -> {rule.precision!r}: {why}")
        examples = ", ".join(repr(n) for n in sorted(names)[:5])
        layers = (f"quantizable layers look like: {examples}" if examples else
                  "the model has no layer mixprec can quantize (no nn.Linear, Conv1D or nn.Embedding left: "
                  "was it quantized already?)")
        raise PolicyError(
            "unused rules (pass allow_unused=True, or write allow_unused = true in a policy TOML, to accept them):"
            "\n  " + "\n  ".join(problems) + f"\n{layers}"
        )

    def explain(self, model: nn.Module, fold_batchnorm: bool = True) -> QuantReport:
        """What :func:`mixprec.quantize` would do, without changing the model (BatchNorm folds and
        ReLU fusions included, as ``quantize(..., fold_batchnorm=...)`` makes them).

        Bytes after are exact: they come from building each layer's storage layout.
        """
        plans = {plan.name: plan for plan in self.plan(model)}
        merges = plan_merges(model, {name for name, plan in plans.items() if plan.precision.family != "fp32"},
                             int8_conv_names(plans.values()), fold_batchnorm)
        folds, relus, folded_into = merges.folds, merges.relus, merges.folded_into
        rows: list[LayerReport] = []
        after_total = 0
        for name, module in modules_with_tensors(model):
            before = own_bytes(module)
            plan = plans.get(name)
            if name in folded_into:
                rows.append(LayerReport(name, type(module).__name__, "folded", f"folded into {folded_into[name]!r}",
                                        "fold_batchnorm", before, 0))
                continue
            if plan is None:
                kernel = f"float32, not folded: {merges.unfolded[name]}" if name in merges.unfolded else "unchanged"
                rows.append(LayerReport(name, type(module).__name__, "fp32", kernel, "-", before, before))
                after_total += before
                continue
            target = build_empty(with_bias_template(module) if name in folds else module, plan.precision)
            if name in relus:
                target.fused_relu = relus[name]
            after = own_bytes(target)
            kernel = getattr(target, "kernel", "float32 (unchanged)")
            if name in folds:
                kernel = f"{kernel}; BatchNorm {folds[name]!r} folded in"
            rows.append(LayerReport(name, type(module).__name__, plan.precision.name, kernel, plan.rule, before, after,
                                    slow_path=getattr(target, "slow_path", None) or ""))
            after_total += after
        return QuantReport(tuple(rows), after_total, model_bytes(model))

    # ---- serialization -------------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        return {
            "default": self.default,
            "allow_unused": self.allow_unused,
            "rules": [{"pattern": r.pattern, "precision": r.precision} for r in self.rules],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Policy:
        """Build from ``{"default": ..., "allow_unused": ..., "rules": [{"pattern", "precision"}]}``."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"a policy is a table/dict, got {type(data).__name__}")
        unknown = set(data) - {"default", "allow_unused", "rules"}
        if unknown:
            raise PolicyError(f"unknown policy keys {sorted(unknown)}; allowed: default, allow_unused, rules")
        rules = []
        for index, entry in enumerate(data.get("rules", [])):  # type: ignore[union-attr]
            if not isinstance(entry, Mapping) or set(entry) != {"pattern", "precision"}:
                raise PolicyError(f"rule {index} must have exactly the keys 'pattern' and 'precision', got {entry!r}")
            rules.append(Rule(entry["pattern"], entry["precision"]))
        return cls(rules, default=data.get("default", "fp32"), allow_unused=data.get("allow_unused", False))  # type: ignore[arg-type]

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Policy:
        """Read a policy file::

            default = "fp32"
            [[rules]]
            pattern = "fc1"
            precision = "int8"
        """
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PolicyError(f"policy file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"policy file {str(path)!r} is not valid TOML: {exc}") from None
        return cls.from_dict(data)

    def to_toml(self) -> str:
        """TOML text that :meth:`from_toml` reads back to an equal policy."""
        lines = [f"default = {_toml_string(self.default)}", f"allow_unused = {str(self.allow_unused).lower()}"]
        for rule in self.rules:
            lines += ["", "[[rules]]", f"pattern = {_toml_string(rule.pattern)}",
                      f"precision = {_toml_string(rule.precision)}"]
        return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    """A TOML literal string when possible (no escapes needed for regexes)."""
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def int8_conv_names(plans: Iterable[LayerPlan]) -> set[str]:
    """The planned convolutions that run int8 x int8 (their epilogue can take a ReLU)."""
    return {plan.name for plan in plans if plan.precision.family in INT8_GEMM_FAMILIES and is_conv(plan.module)}


def quantizable_names(model: nn.Module) -> set[str]:
    """Names of replaceable layers; Linears owned by nn.MultiheadAttention are excluded
    because that module reads their weights directly instead of calling them."""
    skip: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            skip.update(f"{name}.{child}" if name else child for child, _ in module.named_children())
    return {name for name, module in model.named_modules() if name not in skip and quantizable(module)}
