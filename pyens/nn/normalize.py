"""Per-channel input normalisation as the model's first layer.

Normalising inside the model keeps every tensor outside it (data, perturbations, attack
radii, the [0, 1] box) in pixel space, which is where the papers' eps values are defined.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel.

    Args:
        mean, std: length C (or length 1, applied to every channel); ``std > 0``.

    Shapes: ``x`` is ``[B, C, H, W]`` or ``[B, M, C, H, W]`` (MIMO members); the output has
    ``x``'s shape. ``mean``/``std`` are buffers: they move with ``.to()`` and are saved in the
    state dict, so a checkpoint carries its normalisation.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        try:
            mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
            std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise TypeError(f"mean and std must be sequences of numbers; got {mean!r} and {std!r}") from None
        if mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std must be non-empty and of one length; got {len(mean_t)} and {len(std_t)}")
        if not bool(torch.isfinite(mean_t).all()):
            raise ValueError(f"mean must be finite; got {mean_t.tolist()}")
        if not bool((std_t > 0).all() & torch.isfinite(std_t).all()):
            raise ValueError(f"std must be positive and finite; got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(-1, 1, 1))
        self.register_buffer("std", std_t.view(-1, 1, 1))

    @property
    def channels(self) -> int:
        return self.mean.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (4, 5) or self.channels not in (1, x.shape[-3]):
            raise ValueError(f"x must be [B, C, H, W] or [B, M, C, H, W] with C={self.channels}; "
                             f"got shape {tuple(x.shape)}")
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
