"""Robustness evaluation: attacks run batched on a model, per-example results, Table 4."""
from pyens.eval.report import AttackResult, RobustnessReport, format_table
from pyens.eval.robustness import RADII, AttackSpec, evaluate, pgd_specs

__all__ = ["RADII", "AttackResult", "AttackSpec", "RobustnessReport", "evaluate", "format_table", "pgd_specs"]
