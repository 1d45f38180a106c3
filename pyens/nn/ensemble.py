"""Single models, and the member-ensemble interface MIMO and vanilla ensembles share.

A member ensemble of M sub-models over K classes is driven in two ways:

- training (MIMO paper eq. 3; MAT eq. 4-6): ``forward(x [B, M, C, H, W]) -> [B, M, K]``,
  sub-model m on slot m, each slot holding its own inputs (and its own perturbation);
- testing: ``ensemble(x [B, C, H, W]) -> [B, K]`` (the same input to every sub-model,
  predictions averaged) and ``member(i)`` (sub-model i alone, for transfer attacks).

:class:`Ensemble` (M separate networks) and :class:`pyens.nn.MIMO` (one network) both
implement it, so a trainer or an attack treats them alike.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from pyens.checks import positive_int
from pyens.nn.backbones import BackboneFactory, build_backbone
from pyens.nn.normalize import Normalize

AVERAGES = ("prob", "logits")


def average_members(z: torch.Tensor, average: str = "prob") -> torch.Tensor:
    """Combine member logits ``z [B, M, K]`` into ensemble scores ``[B, K]``.

    ``average="prob"``: ``log(mean_m softmax(z_m))``, whose softmax is the averaged
    probability, so argmax and cross-entropy on it are the ensemble's (computed with
    logsumexp, stable for any logits). ``average="logits"``: ``mean_m z_m``.
    """
    if z.dim() != 3:
        raise ValueError(f"z must be [B, M, K]; got shape {tuple(z.shape)}")
    if average == "prob":
        return torch.logsumexp(torch.log_softmax(z, dim=-1), dim=1) - math.log(z.shape[1])
    if average == "logits":
        return z.mean(dim=1)
    raise ValueError(f"average must be one of {', '.join(AVERAGES)}; got {average!r}")


class MemberEnsemble(nn.Module):
    """Base of :class:`Ensemble` and :class:`pyens.nn.MIMO`.

    Subclasses set ``members`` (M), ``num_classes`` (K) and ``in_channels`` (C, or None if
    unknown) and implement ``forward`` (``[B, M, C, H, W] -> [B, M, K]``),
    ``member_logits`` (``[B, C, H, W] -> [B, M, K]``) and ``member``.
    """

    members: int
    num_classes: int
    in_channels: int | None

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits ``[B, M, K]`` on the same input ``x [B, C, H, W]``."""
        raise NotImplementedError

    def member(self, i: int) -> nn.Module:
        """Sub-model ``i`` alone: a module ``[B, C, H, W] -> [B, K]`` sharing this one's parameters."""
        raise NotImplementedError

    def ensemble(self, x: torch.Tensor, *, average: str = "prob") -> torch.Tensor:
        """The ensemble's scores ``[B, K]`` for ``x [B, C, H, W]`` (see :func:`average_members`).

        Differentiable in ``x`` and the parameters: attacks on the ensemble target this.
        """
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {', '.join(AVERAGES)}; got {average!r}")
        return average_members(self.member_logits(x), average)

    def _check_slots(self, x: torch.Tensor) -> None:
        c = "C" if self.in_channels is None else f"C={self.in_channels}"
        if x.dim() != 5 or x.shape[1] != self.members or (self.in_channels not in (None, x.shape[2])):
            raise ValueError(f"x must be [B, M={self.members}, {c}, H, W] (one slot per member); "
                             f"got shape {tuple(x.shape)}")

    def _check_single(self, x: torch.Tensor) -> None:
        c = "C" if self.in_channels is None else f"C={self.in_channels}"
        if x.dim() != 4 or (self.in_channels not in (None, x.shape[1])):
            raise ValueError(f"x must be [B, {c}, H, W] (one input for every member); got shape {tuple(x.shape)}")

    def _check_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.members:
            raise ValueError(f"i must be an int in [0, {self.members}); got {i!r}")
        return i

    def extra_repr(self) -> str:
        return f"members={self.members}, num_classes={self.num_classes}"


class Classifier(nn.Sequential):
    """One model in pixel space: :class:`Normalize` then a backbone, ``[B, C, H, W] -> [B, K]``."""

    def __init__(self, normalize: Normalize, backbone: nn.Module, *, in_channels: int, num_classes: int):
        super().__init__(OrderedDict(normalize=normalize, backbone=backbone))
        self.in_channels, self.num_classes = in_channels, num_classes


def build_model(backbone: str | BackboneFactory, *, in_channels: int, num_classes: int,
                mean: Sequence[float], std: Sequence[float]) -> Classifier:
    """A single model taking pixel-space ``[B, in_channels, H, W]`` and returning ``[B, num_classes]``.

    ``backbone``: a name of :data:`pyens.nn.BACKBONES` or a callable ``(in_channels, num_classes)``.
    ``mean``/``std``: the dataset's per-channel statistics (``ds.mean``, ``ds.std``).
    """
    return Classifier(Normalize(mean, std), build_backbone(backbone, in_channels=in_channels, num_classes=num_classes),
                      in_channels=in_channels, num_classes=num_classes)


class Ensemble(MemberEnsemble):
    """A vanilla ensemble of M separate models with the MIMO interface.

    Args:
        models: M modules, each ``[B, C, H, W] -> [B, K]`` (e.g. from :func:`build_model`).
        num_classes: K; read from ``models[i].num_classes`` when not given.

    ``forward(x [B, M, C, H, W]) -> [B, M, K]`` runs model m on slot m; ``member(i)`` is
    ``models[i]`` itself. Costs M forward passes where a MIMO costs one.
    """

    def __init__(self, models: Sequence[nn.Module], *, num_classes: int | None = None):
        super().__init__()
        models = list(models)
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise ValueError("models must be a non-empty sequence of nn.Module")
        known = {getattr(m, "num_classes", None) for m in models} - {None}
        if num_classes is None and len(known) == 1:
            num_classes = known.pop()
        if num_classes is None or (known and known != {num_classes}):
            raise ValueError(f"num_classes must be given and agree with the models' ({sorted(known)}); "
                             f"got {num_classes!r}")
        channels = {getattr(m, "in_channels", None) for m in models}
        self.models = nn.ModuleList(models)
        self.members = len(models)
        self.num_classes = int(num_classes)
        self.in_channels = channels.pop() if len(channels) == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, M, C, H, W] -> [B, M, K]``: model m sees slot m."""
        self._check_slots(x)
        return torch.stack([model(x[:, m]) for m, model in enumerate(self.models)], dim=1)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        self._check_single(x)
        return torch.stack([model(x) for model in self.models], dim=1)

    def member(self, i: int) -> nn.Module:
        return self.models[self._check_index(i)]


def build_ensemble(backbone: str | BackboneFactory, *, members: int, in_channels: int, num_classes: int,
                   mean: Sequence[float], std: Sequence[float]) -> Ensemble:
    """M independently initialised :func:`build_model` models as an :class:`Ensemble`."""
    positive_int(members, "members")
    return Ensemble([build_model(backbone, in_channels=in_channels, num_classes=num_classes, mean=mean, std=std)
                     for _ in range(members)])
