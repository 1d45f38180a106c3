"""Randomized smoothing and certified accuracy (Cohen et al. 2019; DML paper A.9).

The smoothed classifier ``g(x) = argmax_c P(f(x + sigma eps) = c)``, ``eps ~ N(0, I)``, is
certified at ``x`` with l2 radius ``sigma * Phi^-1(pA)``, ``pA`` a one-sided Clopper-Pearson
lower bound on the top class's probability from ``n`` noise samples, the top class itself
picked from ``n0`` separate samples (CERTIFY of Cohen et al.). ``f`` is any classifier
``[B, C, H, W] -> [B, K]`` judged by its argmax, e.g. a DML ensemble's majority vote.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ABSTAIN = -1


def _counts(model: nn.Module, x: torch.Tensor, sigma: float, n: int, batch: int, num_classes: int,
            generator: torch.Generator | None) -> torch.Tensor:
    """``[K]`` int: argmax counts of ``model`` on ``n`` noisy copies of one input ``x [C, H, W]``."""
    counts = torch.zeros(num_classes, dtype=torch.long)
    left = n
    while left > 0:
        b = min(batch, left)
        noise = torch.randn((b, *x.shape), generator=generator).to(x.device, x.dtype)
        pred = model(x.unsqueeze(0) + sigma * noise).argmax(-1).cpu()
        counts += torch.bincount(pred, minlength=num_classes)
        left -= b
    return counts


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` Clopper-Pearson lower bound of a binomial proportion ``k / n``."""
    from scipy.stats import beta

    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


@torch.no_grad()
def certify(model: nn.Module, x: torch.Tensor, *, sigma: float, n0: int = 100, n: int = 1000,
            alpha: float = 0.001, batch: int = 500, num_classes: int | None = None,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CERTIFY (Cohen et al., Algorithm 1) on each of ``x [B, C, H, W]``.

    Returns ``(prediction [B] long, radius [B] float)``; ``prediction = -1`` (ABSTAIN) and
    ``radius = 0`` where ``pA <= 1/2``. ``generator`` (CPU) makes the noise reproducible.
    """
    from scipy.stats import norm

    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma!r}")
    if not (isinstance(n0, int) and n0 >= 1 and isinstance(n, int) and n >= 1):
        raise ValueError(f"n0 and n must be ints >= 1; got {n0!r}, {n!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha!r}")
    was = model.training
    model.eval()
    k = num_classes or getattr(model, "num_classes", None)
    if k is None:
        k = model(x[:1]).shape[-1]
    preds, radii = [], []
    try:
        for xi in x:
            guess = int(_counts(model, xi, sigma, n0, batch, k, generator).argmax())
            p_a = lower_confidence_bound(int(_counts(model, xi, sigma, n, batch, k, generator)[guess]), n, alpha)
            if p_a > 0.5:
                preds.append(guess)
                radii.append(sigma * float(norm.ppf(p_a)))
            else:
                preds.append(ABSTAIN)
                radii.append(0.0)
    finally:
        model.train(was)
    return torch.tensor(preds), torch.tensor(radii)


def certified_accuracy(prediction: torch.Tensor, radius: torch.Tensor, y: torch.Tensor,
                       radii: Sequence[float]) -> dict[float, float]:
    """Fraction of inputs certified correct at each l2 radius: ``pred == y`` and ``radius >= r``."""
    y = y.cpu()
    ok = prediction.cpu() == y
    return {float(r): float((ok & (radius.cpu() >= r)).float().mean()) for r in radii}
