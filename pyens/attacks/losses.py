"""Per-example attack losses.

Every loss maps logits ``[..., K]`` and integer labels ``[...]`` to one loss per unit
``[...]``: per example for single-input models (``[B, K]``, ``[B]`` -> ``[B]``) and per
(example, member) for MIMO models (``[B, M, K]``, ``[B, M]`` -> ``[B, M]``). Attacks
differentiate the *sum* of these values, so an example's gradient does not depend on the
batch size (a mean would scale it by ``1/B``, which changes nothing for the sign / unit-norm
directions but matters for anything that reads gradient magnitudes).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy per unit: ``logits [..., K]``, ``y [...]`` -> ``[...]`` (MAT paper, eq. 3's L)."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none").view(y.shape)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner logit margin ``max_{j != y} z_j - z_y`` per unit (> 0 iff misclassified).

    ``logits [..., K]``, ``y [...]`` -> ``[...]``.
    """
    true = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[-1]).bool(), float("-inf"))
    return others.amax(-1) - true


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "margin": margin_loss}


def get_loss(loss: str | LossFn) -> LossFn:
    """``"ce"`` / ``"margin"`` (or a callable with the same contract) -> the loss function."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable, got {loss!r}")
    return LOSSES[loss]
