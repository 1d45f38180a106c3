"""The papers' constants, in one place: norm orders, attack radii and PGD step sizes.

Every layer reads them from here (training configs, the evaluation catalogue, the threat
presets, the benchmarks), so a radius is written once.

Two norm orders exist and mean different things:
- :data:`NORMS` is the order of the tables (the MAT paper's Table 4 columns: linf, l2, l1) and
  of ``(linf, l2, l1)`` triples such as :data:`RADII`.
- :data:`MEMBER_NORMS` is the default member order of a multi-norm method: member m of a MAT
  network (or perturbation type m of avg/max/msd) is attacked in ``MEMBER_NORMS[m]``. Trained
  runs record their norms, so this order only decides runs whose config names none.
"""
from __future__ import annotations

NORMS = ("linf", "l2", "l1")
MEMBER_NORMS = ("l1", "l2", "linf")

# MAT paper, Appendix C.1 (training, and PGD at test time), keyed by dataset, then norm; the
# radii are MSD's (Maini et al. 2020). RESISC-45 has no paper value: CIFAR-10's are used.
PAPER_EPS = {
    "mnist": {"linf": 0.3, "l2": 2.0, "l1": 10.0},
    "cifar10": {"linf": 0.03, "l2": 0.5, "l1": 12.0},
    "resisc45": {"linf": 0.03, "l2": 0.5, "l1": 12.0},
}
PAPER_ALPHA = {
    "mnist": {"linf": 0.01, "l2": 0.1, "l1": 0.8},
    "cifar10": {"linf": 0.003, "l2": 0.02, "l1": 1.0},
    "resisc45": {"linf": 0.003, "l2": 0.02, "l1": 1.0},
}

# The same radii and steps as (linf, l2, l1) triples, the evaluation catalogue's form.
RADII = {d: tuple(v[p] for p in NORMS) for d, v in PAPER_EPS.items()}
PAPER_ALPHA_TRIPLES = {d: tuple(v[p] for p in NORMS) for d, v in PAPER_ALPHA.items()}
