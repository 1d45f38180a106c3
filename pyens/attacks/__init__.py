"""Adversarial attacks built on the fused lp step (:func:`pyens.ops.lp_step`).

Single-input models (``f(x) -> [B, K]``, ``x: [B, ...]``):

* :class:`PGD` (l_inf / l_2 / l_1, random start, restarts, CE or margin loss), with the
  presets :class:`FGSM` and :class:`BIM`;
* :class:`MSD` (Maini et al. 2020): the worst of several lp steps at every step.

MIMO models (``f(x) -> [B, M, K]``, ``x: [B, M, ...]``), MAT's inner maximisation:

* :func:`mimo_pgd` (``gradient="approx"``: MAT eq. 6; ``"naive"``: eq. 5);
* :func:`mimo_msd` (every member trained with MSD);
* :func:`mimo_gradient` and :func:`cross_gradient_ratio` (eq. 7, Fig. 1 diagnostics).

Shared by the attacks and by evaluations (``pyens.eval.curves``' noise accuracy):
:func:`random_start`, a uniform draw from an lp ball projected into the box.

Attacks take and return inputs in the box (default ``[0, 1]``), return detached tensors,
never change the model's train/eval mode and never accumulate parameter gradients.
"""
from pyens.attacks.common import random_start
from pyens.attacks.losses import LOSSES, ce_loss, margin_loss
from pyens.attacks.mimo import cross_gradient_ratio, mimo_gradient, mimo_msd, mimo_pgd
from pyens.attacks.msd import MSD
from pyens.attacks.pgd import BIM, FGSM, PGD

__all__ = [
    "BIM",
    "FGSM",
    "LOSSES",
    "MSD",
    "PGD",
    "ce_loss",
    "cross_gradient_ratio",
    "margin_loss",
    "mimo_gradient",
    "mimo_msd",
    "mimo_pgd",
    "random_start",
]
