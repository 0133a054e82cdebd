"""Which layers tolerate which precision: sensitivity analysis (and, later, the search)."""

from mixprec.analysis.sensitivity import METRICS, SensitivityRow, SensitivityTable, sensitivity

__all__ = ["METRICS", "SensitivityRow", "SensitivityTable", "sensitivity"]
