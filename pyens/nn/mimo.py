"""MIMO: M sub-models in one network (Havasi et al. 2021; MAT paper Sec. 2 "MIMO Ensemble").

The M inputs are normalised and concatenated on the channel axis into the first layer; the
last layer has ``M * K`` outputs, read as M heads of K logits. Everything between is shared,
so the MIMO has about the parameters of one model (only the first and last layers grow) and
one forward pass serves all M sub-models: this is what makes MAT cost one PGD per batch
instead of M (MAT paper Table 6).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyens.checks import integer_labels, positive_int, probability
from pyens.nn.backbones import BackboneFactory, build_backbone
from pyens.nn.ensemble import MemberEnsemble
from pyens.nn.normalize import Normalize


class MIMO(MemberEnsemble):
    """A MIMO ensemble of ``members`` sub-models built from one backbone.

    Args:
        backbone: a name of :data:`pyens.nn.BACKBONES` or a callable ``(in_channels, num_classes)``;
            it is built with ``in_channels * members`` inputs and ``num_classes * members`` outputs.
        members: M.
        in_channels: C of one input image.
        num_classes: K per sub-model.
        mean, std: per-channel statistics (length C or 1) for the inputs, applied per slot.

    Shapes: ``forward(x [B, M, C, H, W]) -> [B, M, K]`` (slot m is sub-model m's input; in
    training each slot holds different images, see :func:`mimo_batch`);
    ``ensemble(x [B, C, H, W]) -> [B, K]`` and ``member(i)(x [B, C, H, W]) -> [B, K]`` repeat
    ``x`` in every slot, as the MIMO paper does at test time.
    """

    def __init__(self, backbone: str | BackboneFactory, *, members: int, in_channels: int, num_classes: int,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
        super().__init__()
        self.members = positive_int(members, "members")
        # Checked before the multiplication by M, so an error shows the value passed.
        self.in_channels = positive_int(in_channels, "in_channels")
        self.num_classes = positive_int(num_classes, "num_classes")
        self.normalize = Normalize(mean, std)
        self.backbone = build_backbone(backbone, in_channels=in_channels * members, num_classes=num_classes * members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, M, C, H, W]`` (pixel space) ``-> [B, M, K]`` logits, head m for slot m."""
        self._check_slots(x)
        self._check_values(x)
        b = x.shape[0]
        # Slot-major channel order: slot m occupies input channels m*C .. (m+1)*C - 1.
        z = self.backbone(self.normalize(x).flatten(1, 2))
        if z.shape != (b, self.members * self.num_classes):
            raise ValueError(f"the backbone returned {tuple(z.shape)}, expected [B, M*K] = "
                             f"[{b}, {self.members * self.num_classes}]")
        return z.view(b, self.members, self.num_classes)

    def _check_values(self, x: torch.Tensor) -> None:
        """Float pixels on the model's device, in its dtype or a lower precision: an integer image
        (0..255) would be read as pixel values far outside [0, 1]."""
        ref = self.normalize.mean
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor of pixels in [0, 1], got {x.dtype}")
        if torch.promote_types(x.dtype, ref.dtype) != ref.dtype:
            raise TypeError(f"x must have the model's dtype {ref.dtype} (or a lower precision), got {x.dtype}")
        if x.device != ref.device:
            raise ValueError(f"x must be on the model's device {ref.device}, got {x.device}")

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` repeated in every slot ``-> [B, M, K]``: one forward for all members."""
        self._check_single(x)
        return self.forward(x.unsqueeze(1).expand(-1, self.members, -1, -1, -1))

    def member(self, i: int) -> nn.Module:
        """Sub-model ``i``: ``[B, C, H, W] -> [B, K]``, input repeated in every slot; shares parameters."""
        return MIMOMember(self, self._check_index(i))


class MIMOMember(nn.Module):
    """Head ``index`` of a :class:`MIMO` as a standalone classifier (a view, not a copy)."""

    def __init__(self, mimo: MIMO, index: int):
        super().__init__()
        self.mimo, self.index = mimo, index
        self.in_channels, self.num_classes = mimo.in_channels, mimo.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mimo.member_logits(x)[:, self.index]

    def extra_repr(self) -> str:
        return f"index={self.index}"


def mimo_batch(x: torch.Tensor, y: torch.Tensor, members: int, *,
               generator: torch.Generator | None = None,
               repetition: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MIMO training inputs: M shuffles of one batch, one per slot (MIMO paper's input sampling).

    Args:
        x: ``[B, C, H, W]`` images; y: ``[B]`` labels.
        members: M.
        generator: source of the shuffles.
        repetition: input repetition rho (Havasi et al., Sec. 3.4): each example, with
            probability rho, fills every slot with its own image instead of the shuffles'.
            ``1.0`` gives every slot the same batch, as in the MAT paper's Algorithm 1
            (``adv = x``); ``0.0`` (default) draws no extra random numbers.

    Returns:
        ``(x [B, M, C, H, W], y [B, M])`` with ``x[:, m] = x[perm_m]``, ``y[:, m] = y[perm_m]``.
        Slot 0 keeps the batch order (``perm_0`` is the identity) and slots 1..M-1 are
        independent random permutations: the batch is already a random draw, so slot 0 loses
        no randomness, every example is still seen once per epoch in slot 0, and ``members=1``
        is exactly ordinary training.
    """
    positive_int(members, "members")
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W]; got shape {tuple(x.shape)}")
    b = x.shape[0]
    if y.shape != (b,):
        raise ValueError(f"y must be [B={b}] labels matching x; got shape {tuple(y.shape)}")
    integer_labels(y, "y")
    repetition = probability(repetition, "repetition")
    device = generator.device if generator is not None else torch.device("cpu")
    perms = [torch.arange(b, device=device)]
    perms += [torch.randperm(b, generator=generator, device=device) for _ in range(members - 1)]
    index = torch.stack(perms, dim=1)  # [B, M]
    if repetition > 0.0:
        repeat = torch.rand(b, generator=generator, device=device) < repetition
        index = torch.where(repeat[:, None], perms[0][:, None], index)
    index = index.to(x.device)
    return x[index], y[index]
