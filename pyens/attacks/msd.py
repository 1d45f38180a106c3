"""Multi steepest descent (Maini, Wong & Kolter 2020), for single-input models and MIMO slices.

Per step: ONE forward + backward for the gradient at the current ``delta``; then for each
norm p a candidate ``lp_step`` from the current ``delta`` (projected onto its own
``B_p(eps_p) ∩ box``), scored by a forward without backward; the candidate with the highest
loss becomes the next ``delta``. Cost per step: ``1 + P`` forwards, 1 backward, ``P`` lp_step
launches (MAT paper, Table 6), whether the P scoring forwards run one by one or as one pass
over the P stacked candidate batches.

Two selection rules (``select=``):

* ``"example"`` (Maini et al., Algorithm 2): the choice is made per unit (example, or
  (example, member) pair) and the best candidate over all steps is returned.
* ``"batch"`` (the MAT authors' code, ``attack.py`` ``MSDStep.step`` of
  RuqiBai/MIMO_Adversarial_Training at 81c380f): per member, the norm whose candidate has
  the highest loss summed over the batch moves every example of that member's slot; the last
  iterate is returned. See docs/training.md, "Paper text and authors' code".
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pyens.attacks.common import (
    check_inputs,
    check_run,
    evaluate,
    finish,
    keep_max,
    loss_and_grad,
    lp_params,
)
from pyens.attacks.losses import ce_loss
from pyens.checks import choice_arg
from pyens.ops import lp_step

SELECTS = ("example", "batch")
KEEPS = ("best", "last")
SCORES = ("auto", "stacked", "per_norm")


def check_k_range(k_range, name: str = "k_range") -> tuple[int, int] | None:
    """``None`` / empty (fixed k) or ``(lo, hi)`` ints with ``1 <= lo <= hi``."""
    if k_range is None or (isinstance(k_range, (list, tuple)) and len(k_range) == 0):
        return None
    try:
        lo, hi = k_range
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be empty or a pair (lo, hi), got {k_range!r}") from None
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must hold ints >= 1, got {k_range!r}")
    if lo > hi:
        raise ValueError(f"{name} must have lo <= hi, got {k_range!r}")
    return int(lo), int(hi)


def _scores(model: Callable, x: torch.Tensor, y: torch.Tensor, cands: list[torch.Tensor],
            score: str) -> torch.Tensor:
    """Unit losses of every candidate, ``[P, *y.shape]``: P forwards, or one over the P stacked
    batches (a pass over P*B examples, which Table 6 counts as P forwards).

    ``"auto"``: stacked on a GPU (one launch sequence instead of P), one forward per norm on the
    CPU, where the stacked pass measured 1.3x slower (small CNN, B = 100, M = 3, one thread:
    ``docs/training.md``, "Scoring the candidates").
    """
    if score == "auto":
        score = "stacked" if x.is_cuda else "per_norm"
    if score == "per_norm" or len(cands) == 1:
        return torch.stack([evaluate(model, x, c, y, ce_loss)[0] for c in cands])
    p = len(cands)
    rep = lambda t: t.unsqueeze(0).expand(p, *t.shape).flatten(0, 1)  # noqa: E731
    loss, _ = evaluate(model, rep(x), torch.cat(cands), rep(y), ce_loss)
    return loss.view(p, *y.shape)


def msd_iterate(model: Callable, x: torch.Tensor, y: torch.Tensor, *, norms: Sequence[str],
                eps: Sequence[float], alpha: Sequence[float], k: Sequence[int], steps: int,
                box: tuple[float, float], projection: str, members: int | None = None,
                select: str = "example", keep: str | None = None, start: torch.Tensor | None = None,
                k_range: tuple[int, int] | None = None, score: str = "auto") -> torch.Tensor:
    """The MSD loop over units; returns the kept perturbation (``x``'s shape).

    Units are examples (``x: [B, ...]``, ``y: [B]``, ``members=None``) or (example, member)
    pairs (``x: [B, M, ...]``, ``y: [B, M]``, ``members=M``; the CE of member m scores
    slice m, and every candidate moves all M slices in one ``lp_step`` launch).

    ``select``: ``"example"`` chooses per unit; ``"batch"`` per member (per batch for a single
    model) by the loss summed over the batch. ``keep``: ``"best"`` (the highest-loss iterate
    per unit over all steps) or ``"last"``; default ``"best"`` for ``"example"`` and
    ``"last"`` for ``"batch"``. Ties keep the earlier norm / step. ``start``: the initial
    ``delta`` (default zeros). ``k_range``: draw the l1 sparsity uniformly from ``[lo, hi]``
    at every step (one draw per slot; the global torch RNG), instead of ``k``.
    """
    keep = keep or ("best" if select == "example" else "last")
    delta = torch.zeros_like(x) if start is None else start
    best = None
    slots = members or 1
    for _ in range(steps):
        _, _, grad = loss_and_grad(model, x, delta, y, ce_loss)
        cands = []
        for p, e, a, kk in zip(norms, eps, alpha, k):
            if k_range is not None:
                kk = torch.randint(k_range[0], k_range[1] + 1, (slots,)).tolist()
                kk = kk if members else kk[0]
            cands.append(lp_step(delta, grad, x, norm=p, eps=e, alpha=a, k=kk, box=box, projection=projection,
                                 members=members))
        losses = _scores(model, x, y, cands, score)  # [P, *units]
        if select == "batch":  # one norm per member (per batch), by the batch-summed loss
            losses = losses.sum(1, keepdim=True).expand_as(losses)
        chosen = None
        for cand, loss in zip(cands, losses):
            chosen = keep_max(chosen, cand, loss)
        delta = chosen[0]
        if keep == "best":
            best = keep_max(best, *chosen)
    return delta if keep == "last" else best[0]


class MSD:
    """MSD attack: the worst of several lp steps at every PGD step (Maini et al. 2020).

    Args:
        model: callable ``f(x) -> logits``, ``x: [B, ...]`` -> ``[B, K]``; mode left as is.
        norms: the norms whose steps compete, e.g. ``("linf", "l2", "l1")``.
        eps, alpha: radius / step size per norm (sequence aligned with ``norms``, or one
            scalar for all), pixel units. Each candidate is projected onto its OWN ball ∩ box,
            so the result lies in the union of the balls.
        steps: iterations K. k: l1 sparsity (scalar or per norm).
        select: ``"example"`` (Maini et al.: per example, best over steps) or ``"batch"``
            (one norm per step for the whole batch by its summed loss, last iterate; the MAT
            authors' rule, see :func:`msd_iterate`).
        k_range: ``(lo, hi)``: draw the l1 sparsity from ``[lo, hi]`` at every step instead of k.
        score: ``"stacked"`` (the P candidates scored in one forward over P*B examples),
            ``"per_norm"`` (P forwards) or ``"auto"`` (stacked on a GPU); the same result and
            Table 6 count.
        projection: ``"exact"`` or ``"sequential"``. box: ``(lo, hi)``.

    ``attack(x, y)``, ``x: [B, ...]``, ``y: [B]`` -> detached ``x_adv``: per example the
    highest-CE candidate over all steps (``select="example"``). Cost: ``(1 + P) K`` forwards,
    ``K`` backwards for ``P = len(norms)`` (MAT paper, Table 6).
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], *,
                 norms: Sequence[str] = ("linf", "l2", "l1"), eps, alpha, steps: int,
                 k: int | Sequence[int] = 20, select: str = "example", k_range: tuple[int, int] | None = None,
                 score: str = "auto", projection: str = "exact", box: tuple[float, float] = (0, 1)):
        self.model = model
        self.norms, self.eps, self.alpha, self.k = lp_params(norms, eps, alpha, k)
        self.steps, self.projection, self.box = check_run(steps, projection, box)
        self.select = choice_arg(select, "select", SELECTS)
        self.k_range = check_k_range(k_range)
        self.score = choice_arg(score, "score", SCORES)

    def __repr__(self) -> str:
        return (f"MSD(norms={tuple(self.norms)}, eps={tuple(self.eps)}, alpha={tuple(self.alpha)}, "
                f"steps={self.steps}, k={tuple(self.k)}, select={self.select!r}, k_range={self.k_range}, "
                f"score={self.score!r}, projection={self.projection!r}, box={self.box})")

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y, box = check_inputs(x, y, self.box)
        delta = msd_iterate(self.model, x, y, norms=self.norms, eps=self.eps, alpha=self.alpha, k=self.k,
                            steps=self.steps, box=box, projection=self.projection, select=self.select,
                            k_range=self.k_range, score=self.score)
        return finish(x, delta, box)
