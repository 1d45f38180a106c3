"""Learning-rate schedules of the MAT paper (Appendix C.1, following Wong et al. 2020).

Each schedule maps training progress ``t`` in [0, 1] (fraction of all optimizer steps) to a
multiple of the peak learning rate, so it is independent of epochs and batch size.
"""
from __future__ import annotations

import numpy as np


def triangular(t: float) -> float:
    """MNIST: linear 0 -> peak over the first 40 %, then down to 0 over the last 60 %."""
    return float(np.interp(t, [0.0, 0.4, 1.0], [0.0, 1.0, 0.0]))


def three_phase(t: float) -> float:
    """CIFAR-10: 0 -> peak (0.1) over 40 %, down to 0.005 over the next 40 %, to 0 at the end."""
    return float(np.interp(t, [0.0, 0.4, 0.8, 1.0], [0.0, 1.0, 0.05, 0.0]))


def constant(t: float) -> float:
    return 1.0


SCHEDULES = {"triangular": triangular, "three_phase": three_phase, "constant": constant}


def lr_at(schedule: str, peak: float, step: int, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``.

    The rate is taken at the step's midpoint so that the first step of a warm-up is not
    exactly zero (a zero step would waste a batch).
    """
    return peak * SCHEDULES[schedule]((step + 0.5) / max(total, 1))
