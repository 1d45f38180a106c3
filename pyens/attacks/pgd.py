"""Projected gradient descent in l_inf, l_2 and l_1 (MAT paper, eq. 1), with FGSM and BIM.

``x_adv = PGD(model, norm=..., eps=..., alpha=..., steps=...)(x, y)``; every step is one
forward, one backward and one fused :func:`pyens.ops.lp_step`:

    delta <- Π_{B_p(eps) ∩ box}( delta + alpha * V_p(∇_delta Σ_b L(f(x_b + delta_b), y_b)) )
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from pyens.attacks.common import (
    check_inputs,
    check_norm,
    check_run,
    evaluate,
    finish,
    iterate,
    loss_and_grad,
    random_start,
    where_units,
)
from pyens.attacks.losses import LossFn, get_loss
from pyens.checks import flag_arg, positive_int, real_arg


class PGD:
    """PGD attack (Madry et al. 2018; MAT paper eq. 1) in one lp norm, optionally restarted.

    Args:
        model: callable ``f(x) -> logits``, ``x: [B, ...]`` (e.g. ``[B, C, H, W]``) ->
            ``[B, K]``. For an ensemble pass its combined score function (e.g.
            ``mimo.ensemble``). Its train/eval mode is left as it is.
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        eps: radius of the lp ball (pixel units, ``>= 0``).
        alpha: step size (pixel units): each step moves ``alpha`` of lp mass along
            ``V_p(grad)`` (sign; unit l2 direction; sparse l1 direction over ``k`` coordinates)
            before the projection.
        steps: PGD iterations K (``>= 1``).
        k: coordinates moved per l1 step (docs/ops.md, ``steepest_direction``; papers: 20).
        random_start: start each restart at a random point of ``B_p(eps) ∩ box``: uniform in
            the box-clipped linf cube; for l2 / l1 a point uniform by volume in the ball
            (sphere-uniform direction from normalised Gaussian / Laplace noise, radius
            ``eps * U^(1/n)``), then :func:`pyens.ops.lp_project`-ed onto ball ∩ box.
            Otherwise start at ``delta = 0``. Uses the global torch RNG.
        restarts: independent runs (``>= 1``). Per example the run kept is the one that
            misclassifies, and among runs that agree on that, the one with the highest final
            loss. With ``restarts > 1`` each run ends with one extra forward to score it.
        projection: ``"exact"`` (Euclidean projection onto ball ∩ box) or ``"sequential"``
            (ball then box clamp: torchattacks' and MSD's convention).
        loss: ``"ce"`` (cross entropy) or ``"margin"`` (``max_{j != y} z_j - z_y``), or a
            callable ``(logits [B, K], y [B]) -> [B]``; summed over the batch so that an
            example's gradient does not depend on ``B``.
        box: ``(lo, hi)`` valid input range; ``x`` must lie in it.

    Call ``attack(x, y)`` with ``x: [B, ...]`` in the box and ``y: [B]`` int labels; returns the
    detached ``x_adv`` (``x``'s shape and dtype) with ``||x_adv - x||_p <= eps`` per example.
    Cost: ``restarts * steps`` forwards and backwards (+ ``restarts`` scoring forwards when
    ``restarts > 1``), one ``lp_step`` launch per step; no parameter gradients are accumulated.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], *, norm: str, eps: float, alpha: float,
                 steps: int, k: int = 20, random_start: bool = False, restarts: int = 1,
                 projection: str = "exact", loss: str | LossFn = "ce", box: tuple[float, float] = (0, 1)):
        self.model = model
        self.norm = check_norm(norm, "norm")
        self.eps = real_arg(eps, "eps")
        self.alpha = real_arg(alpha, "alpha")
        self.steps, self.projection, self.box = check_run(steps, projection, box)
        self.k = positive_int(k, "k")
        self.random_start = flag_arg(random_start, "random_start")
        self.restarts = positive_int(restarts, "restarts")
        if self.restarts > 1 and not self.random_start:
            raise ValueError(f"restarts={self.restarts} needs random_start=True: from delta = 0 every "
                             "restart is the same run")
        self.loss = loss
        self.loss_fn = get_loss(loss)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(norm={self.norm!r}, eps={self.eps}, alpha={self.alpha}, "
                f"steps={self.steps}, k={self.k}, random_start={self.random_start}, "
                f"restarts={self.restarts}, projection={self.projection!r}, loss={self.loss!r}, box={self.box})")

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One restart: the final perturbation ``delta [B, ...]``."""
        if self.random_start:
            delta = random_start(x, [self.norm], [self.eps], self.box, self.projection)
        else:
            delta = torch.zeros_like(x)
        return iterate(lambda d: loss_and_grad(self.model, x, d, y, self.loss_fn)[2], x, delta, self.steps,
                       norm=self.norm, eps=self.eps, alpha=self.alpha, k=self.k, box=self.box,
                       projection=self.projection)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y, _ = check_inputs(x, y, self.box)
        if self.restarts == 1:
            return finish(x, self._run(x, y), self.box)
        best = None  # (delta, fooled, loss) of the run kept per example
        for _ in range(self.restarts):
            delta = self._run(x, y)
            loss, logits = evaluate(self.model, x, delta, y, self.loss_fn)
            fooled = logits.argmax(-1) != y
            if best is None:
                best = (delta, fooled, loss)
                continue
            better = (fooled & ~best[1]) | ((fooled == best[1]) & (loss > best[2]))
            best = (where_units(better, delta, best[0]), fooled | best[1], torch.where(better, loss, best[2]))
        return finish(x, best[0], self.box)


class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al. 2015): one l_inf step of size ``eps`` from x.

    ``x_adv = clamp(x + eps * sign(∇_x L), box)``; ``x: [B, ...]``, ``y: [B]``.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], *, eps: float,
                 box: tuple[float, float] = (0, 1)):
        super().__init__(model, norm="linf", eps=eps, alpha=eps, steps=1, box=box)


class BIM(PGD):
    """Basic iterative method (Kurakin et al. 2017): l_inf PGD from x, no random start.

    ``steps`` sign steps of size ``alpha``, each clipped to the ``eps`` cube and the box;
    ``x: [B, ...]``, ``y: [B]``.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], *, eps: float, alpha: float, steps: int,
                 box: tuple[float, float] = (0, 1)):
        super().__init__(model, norm="linf", eps=eps, alpha=alpha, steps=steps, box=box)
