"""Robustness evaluation: the papers' attack catalogue run batched on a model, per-example
results and their unions (Table 4), transferability between members (Tables 1-3, 9-12),
training diagnostics (Figs. 1, 4; DML Figs. 9-11), curves and plots (Figs. 2-3), sanity
checks against false robustness, CLEVER scores (:func:`clever`), and the Markdown report of
a run (``pyens report``)."""
from pyens.eval.catalogue import (
    CATALOGUE,
    DEFAULT_PRESET,
    PAPER_ALPHA,
    PRESETS,
    RADII,
    AttackSpec,
    catalogue,
    pgd_specs,
    preset_attacks,
    resolve_radii,
)
from pyens.eval.clever_score import CleverResult, clever
from pyens.eval.results import AttackResult, RobustnessReport, format_table
from pyens.eval.robustness import evaluate, lp_norm, targets

__all__ = ["CATALOGUE", "DEFAULT_PRESET", "PAPER_ALPHA", "PRESETS", "RADII", "AttackResult", "AttackSpec",
           "CleverResult", "RobustnessReport", "catalogue", "clever", "evaluate", "format_table", "lp_norm", "pgd_specs", "preset_attacks",
           "resolve_radii", "targets"]
