"""Inner maximisation of MIMO adversarial training (MAT paper, Sec. 3, Algorithm 1, App. B).

A MIMO model takes one input per member and returns one logit vector per member:
``model(x) -> [B, M, K]`` for ``x: [B, M, ...]`` (e.g. ``[B, M, C, H, W]``); member m's loss
is ``L_m = CE(z[:, m], y[:, m])`` with ``y: [B, M]``. Member m's slice ``x[:, m]`` is attacked
in its own norm with its own radius, step size and l1 sparsity, and all M slices are stepped
by ONE :func:`pyens.ops.lp_step` launch per step.

Gradients (``gradient=``):

* ``"approx"`` (MAT, eq. 6, Algorithm 1): slot m is stepped along
  ``∇_{x_m} Σ_j L_j``, which one backward pass of the summed member losses gives for all
  slots at once. It differs from the true gradient by the cross gradient (eq. 7).
* ``"naive"`` (eq. 5, "M-MIMO AT without approx."): slot m is stepped along its member's own
  ``∇_{x_m} L_m``: one forward and M backward passes per step.

Losses are summed over the batch (and over members for ``"approx"``), so per-example
gradients do not depend on ``B``. Pass counts per K-step attack (Table 6, without the
training forward/backward): approx K forwards / K backwards; naive K / MK; mimo_msd
``(1 + P) K`` / K with ``P`` norms.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from pyens.attacks.common import (
    check_inputs,
    check_norm,
    check_run,
    finish,
    forward,
    grad_of,
    iterate,
    loss_and_grad,
    lp_params,
    per_entry,
)
from pyens.attacks.common import random_start as draw_start
from pyens.attacks.losses import ce_loss
from pyens.attacks.msd import SCORES, SELECTS, check_k_range, msd_iterate
from pyens.checks import choice_arg, flag_arg

GRADIENTS = ("approx", "naive")
Model = Callable[[torch.Tensor], torch.Tensor]


def _member_grads(model: Model, x: torch.Tensor, delta: torch.Tensor,
                  y: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """One forward, then for each member j ``(j, ∇_delta L_j)`` (``[B, M, ...]``): M backwards."""
    d, _, loss = forward(model, x, delta, y, ce_loss)
    m = y.shape[1]
    for j in range(m):
        member = torch.zeros_like(loss)
        member[:, j] = 1
        yield j, grad_of(loss, d, member, retain_graph=j < m - 1)


def _gradient(model: Model, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor, gradient: str) -> torch.Tensor:
    if gradient == "approx":  # eq. 6: one backward of Σ_b Σ_j L_j
        return loss_and_grad(model, x, delta, y, ce_loss)[2]
    g = torch.empty_like(x)  # eq. 5: slice m of member m's own gradient
    for j, gj in _member_grads(model, x, delta, y):
        g[:, j] = gj[:, j]
    return g


def mimo_gradient(model: Model, x: torch.Tensor, y: torch.Tensor, *, delta: torch.Tensor | None = None,
                  gradient: str = "approx", box: tuple[float, float] = (0, 1)) -> torch.Tensor:
    """The gradient a MIMO attack step uses at ``x + delta`` (``[B, M, ...]``, detached).

    ``"approx"``: slot m holds ``∇_{x_m} Σ_j L_j`` (eq. 6: true gradient + cross gradient,
    eq. 7); ``"naive"``: slot m holds ``∇_{x_m} L_m`` (eq. 5). ``x: [B, M, ...]``,
    ``y: [B, M]``, ``delta`` defaults to zeros.
    """
    x, y, _ = check_inputs(x, y, box, members=True)
    choice_arg(gradient, "gradient", GRADIENTS)
    if delta is not None:
        if not isinstance(delta, torch.Tensor) or delta.shape != x.shape:
            raise ValueError(f"delta must have x's shape {tuple(x.shape)}, got {getattr(delta, 'shape', delta)!r}")
        if delta.dtype != x.dtype or delta.device != x.device:
            raise TypeError(f"delta must match x's dtype {x.dtype} and device {x.device}, got {delta.dtype} "
                            f"on {delta.device}")
        if not bool(torch.isfinite(delta).all()):
            raise ValueError("delta must be finite, got NaN or infinity")
    return _gradient(model, x, torch.zeros_like(x) if delta is None else delta.detach(), y, gradient)


def mimo_pgd(model: Model, x: torch.Tensor, y: torch.Tensor, *, norms: str | Sequence[str],
             eps: float | Sequence[float], alpha: float | Sequence[float], steps: int,
             k: int | Sequence[int] = 20, gradient: str = "approx", random_start: bool = False,
             projection: str = "exact", box: tuple[float, float] = (0, 1)) -> torch.Tensor:
    """MIMO PGD: each member's slice attacked in its own norm (MAT's inner maximisation).

    ``delta_m <- Π_{B_{p_m}(eps_m) ∩ box}(delta_m + alpha_m V_{p_m}(g_m))`` with ``g_m`` from
    eq. 6 (``gradient="approx"``, Algorithm 1) or eq. 5 (``"naive"``).

    Args:
        model: ``model(x) -> [B, M, K]`` for ``x: [B, M, ...]``; mode left as is.
        x: ``[B, M, ...]`` clean member inputs in the box; y: ``[B, M]`` int labels.
        norms, eps, alpha, k: per member (length M) or one value for all members.
        steps: K. gradient: ``"approx"`` or ``"naive"``.
        random_start: start each slice uniformly in its own ball ∩ box (see
            :class:`pyens.attacks.PGD`); else at ``delta = 0`` (Algorithm 1).
        projection: ``"exact"`` or ``"sequential"``. box: ``(lo, hi)``.

    Returns:
        Detached ``x_adv: [B, M, ...]``, the last iterate (Algorithm 1 keeps no best).
        Cost: K forwards and K (approx) or MK (naive) backwards; K lp_step launches.
    """
    steps, projection, box = check_run(steps, projection, box)
    x, y, _ = check_inputs(x, y, box, members=True)
    m = x.shape[1]
    norms, eps, alpha, k = lp_params(norms, eps, alpha, k, m, "member")
    choice_arg(gradient, "gradient", GRADIENTS)
    if flag_arg(random_start, "random_start"):
        delta = draw_start(x, norms, eps, box, projection, members=m)
    else:
        delta = torch.zeros_like(x)
    delta = iterate(lambda d: _gradient(model, x, d, y, gradient), x, delta, steps, norm=norms, eps=eps,
                    alpha=alpha, k=k, members=m, box=box, projection=projection)
    return finish(x, delta, box)


def mimo_msd(model: Model, x: torch.Tensor, y: torch.Tensor, *, norms: Sequence[str] = ("linf", "l2", "l1"),
             eps: float | Sequence[float], alpha: float | Sequence[float], steps: int,
             k: int | Sequence[int] = 20, select: str = "example", random_start: bool = False,
             start_norms: Sequence[str] | None = None, k_range: tuple[int, int] | None = None,
             score: str = "auto", projection: str = "exact",
             box: tuple[float, float] = (0, 1)) -> torch.Tensor:
    """MSD inside MAT (``mat_msd``, MAT paper App. F): every member trained with MSD.

    Per step: one forward + ONE backward of ``Σ_b Σ_m L_m`` (the eq. 6 gradient); for each
    norm p one candidate ``lp_step`` of ALL member slices (one launch, each slice projected
    onto ``B_p(eps_p) ∩ box``), and the P candidates scored (one forward of the P stacked
    batches, or one forward each). Slice m's next delta is then chosen by member m's loss
    ``L_m`` (MIMO's premise: member m depends mainly on slot m; Fig. 1 shows the cross
    gradients are small):

    * ``select="example"``: per (example, member) the highest-loss candidate; the best
      candidate over all steps is returned (Maini et al.'s rule, per slot).
    * ``select="batch"``: per member the norm whose candidate has the highest ``L_m`` summed
      over the batch moves every example of slot m; the last iterate is returned. This is
      the adversary of the MAT authors' code (``attack.py``, ``MSDStep.step``, at 81c380f),
      which trained every "MAT" model of their paper.

    Args:
        model: ``[B, M, ...] -> [B, M, K]``. x: ``[B, M, ...]``; y: ``[B, M]``.
        norms: the competing norms (default linf, l2, l1); eps, alpha, k: per norm (a
            sequence aligned with ``norms``) or one scalar, shared by all members.
        steps: K. select: ``"example"`` or ``"batch"``.
        random_start: start slot m uniformly in ``B_{q_m}(eps_{q_m}) ∩ box`` with ``q_m =
            start_norms[m]`` (the authors' per-slot norm list; default ``norms`` when it has
            one entry per member, else ``norms[0]`` for every slot). Uses the global torch RNG.
        k_range: ``(lo, hi)``: draw each slot's l1 sparsity from ``[lo, hi]`` at every step
            (the authors drew from 5..20) instead of ``k``.
        score: ``"stacked"`` or ``"per_norm"`` (see :class:`pyens.attacks.MSD`).
        projection, box: as in :func:`mimo_pgd`.

    Returns:
        Detached ``x_adv: [B, M, ...]``. Cost: ``(1 + P) K`` forwards and K backwards (Table 6
        counts ``(1 + M) K + 1`` with the training forward, ``P = M = 3`` there).
    """
    steps, projection, box = check_run(steps, projection, box)
    x, y, _ = check_inputs(x, y, box, members=True)
    m = x.shape[1]
    norms, eps, alpha, k = lp_params(norms, eps, alpha, k)
    choice_arg(select, "select", SELECTS)
    choice_arg(score, "score", SCORES)
    k_range = check_k_range(k_range)
    start = None
    if flag_arg(random_start, "random_start"):
        if start_norms is None:
            start_norms = norms if len(norms) == m else [norms[0]] * m
        start_norms = per_entry(list(start_norms), m, "start_norms", "member", check_norm)
        radius = {p: e for p, e in zip(norms, eps)}
        missing = sorted(set(start_norms) - set(radius))
        if missing:
            raise ValueError(f"start_norms: {missing} must be among norms {tuple(norms)} (their eps is the radius)")
        start = draw_start(x, start_norms, [radius[p] for p in start_norms], box, projection, members=m)
    elif start_norms is not None:
        raise ValueError("start_norms needs random_start=True")
    delta = msd_iterate(model, x, y, norms=norms, eps=eps, alpha=alpha, k=k, steps=steps, box=box,
                        projection=projection, members=m, select=select, start=start, k_range=k_range,
                        score=score)
    return finish(x, delta, box)


def cross_gradient_ratio(model: Model, x_adv: torch.Tensor, y: torch.Tensor, *,
                         box: tuple[float, float] = (0, 1)) -> torch.Tensor:
    """Per member, ``||∇_{x_m} Σ_{j≠m} L_j||_2 / ||∇_{x_m} L_m||_2`` averaged over the batch.

    The cross gradient (eq. 7) relative to the true gradient: the Fig. 1 diagnostic of how
    much the MAT step (eq. 6) deviates from the naive one (eq. 5). ``x_adv: [B, M, ...]``,
    ``y: [B, M]`` -> ``[M]`` (detached). Each block ``∇_{x_m} L_j`` comes straight from one of
    M backward passes (no subtraction, so a small cross gradient keeps its precision).
    Examples whose true gradient is exactly zero are left out of their member's mean (NaN if
    all are).
    """
    x, y, _ = check_inputs(x_adv, y, box, members=True)
    true = torch.empty_like(x)
    cross = torch.zeros_like(x)
    for j, gj in _member_grads(model, x, torch.zeros_like(x), y):
        true[:, j] = gj[:, j]
        # gj is not written to: autograd may return an expanded (stride-0) gradient
        cross[:, :j] += gj[:, :j]
        cross[:, j + 1:] += gj[:, j + 1:]
    den = true.flatten(2).norm(dim=2)
    ratio = cross.flatten(2).norm(dim=2) / den
    return torch.where(den > 0, ratio, torch.nan).nanmean(dim=0)
