"""Multi steepest descent (Maini, Wong & Kolter 2020), for single-input models and MIMO slices.

Per step: ONE forward + backward for the gradient at the current ``delta``; then for each
norm p a candidate ``lp_step`` from the current ``delta`` (projected onto its own
``B_p(eps_p) ∩ box``) and one forward (no backward) to score it; per unit the candidate with
the highest loss becomes the next ``delta``. The best candidate over all steps is returned.
Cost per step: ``1 + P`` forwards, 1 backward, ``P`` lp_step launches (MAT paper, Table 6).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pyens.attacks._common import (
    check_inputs,
    check_run,
    evaluate,
    finish,
    keep_max,
    loss_and_grad,
    lp_params,
)
from pyens.attacks.losses import ce_loss
from pyens.ops import lp_step


def msd_iterate(model: Callable, x: torch.Tensor, y: torch.Tensor, *, norms: Sequence[str],
                eps: Sequence[float], alpha: Sequence[float], k: Sequence[int], steps: int,
                box: tuple[float, float], projection: str, members: int | None = None) -> torch.Tensor:
    """The MSD loop over units; returns the best perturbation (``x``'s shape).

    Units are examples (``x: [B, ...]``, ``y: [B]``, ``members=None``) or (example, member)
    pairs (``x: [B, M, ...]``, ``y: [B, M]``, ``members=M``; the CE of member m scores
    slice m, and every candidate moves all M slices in one ``lp_step`` launch). Candidate and
    best-over-steps choices are per unit; ties keep the earlier norm / step.
    """
    delta = torch.zeros_like(x)
    best = None
    for _ in range(steps):
        _, _, grad = loss_and_grad(model, x, delta, y, ce_loss)
        chosen = None
        for p, e, a, kk in zip(norms, eps, alpha, k):
            cand = lp_step(delta, grad, x, norm=p, eps=e, alpha=a, k=kk, box=box, projection=projection,
                           members=members)
            chosen = keep_max(chosen, cand, evaluate(model, x, cand, y, ce_loss)[0])
        delta = chosen[0]
        best = keep_max(best, *chosen)
    return best[0]


class MSD:
    """MSD attack: the worst of several lp steps at every PGD step (Maini et al. 2020).

    Args:
        model: callable ``f(x) -> logits``, ``x: [B, ...]`` -> ``[B, K]``; mode left as is.
        norms: the norms whose steps compete, e.g. ``("linf", "l2", "l1")``.
        eps, alpha: radius / step size per norm (sequence aligned with ``norms``, or one
            scalar for all), pixel units. Each candidate is projected onto its OWN ball ∩ box,
            so the result lies in the union of the balls.
        steps: iterations K. k: l1 sparsity (scalar or per norm).
        projection: ``"exact"`` or ``"sequential"``. box: ``(lo, hi)``.

    ``attack(x, y)``, ``x: [B, ...]``, ``y: [B]`` -> detached ``x_adv``: per example the
    highest-CE candidate over all steps. Cost: ``(1 + P) K`` forwards, ``K`` backwards for
    ``P = len(norms)`` (MAT paper, Table 6).
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], *,
                 norms: Sequence[str] = ("linf", "l2", "l1"), eps, alpha, steps: int,
                 k: int | Sequence[int] = 20, projection: str = "exact", box: tuple[float, float] = (0, 1)):
        self.model = model
        self.norms, self.eps, self.alpha, self.k = lp_params(norms, eps, alpha, k)
        self.steps, self.projection, self.box = check_run(steps, projection, box)

    def __repr__(self) -> str:
        return (f"MSD(norms={tuple(self.norms)}, eps={tuple(self.eps)}, alpha={tuple(self.alpha)}, "
                f"steps={self.steps}, k={tuple(self.k)}, projection={self.projection!r}, box={self.box})")

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y, box = check_inputs(x, y, self.box)
        delta = msd_iterate(self.model, x, y, norms=self.norms, eps=self.eps, alpha=self.alpha, k=self.k,
                            steps=self.steps, box=box, projection=self.projection)
        return finish(x, delta, box)
