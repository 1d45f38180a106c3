"""What every training method shares: the step context, the method base class, the registry and
the outer-loss helpers.

The method families (:mod:`pyens.training.methods`: the MAT paper and its baselines;
:mod:`pyens.training.dml_methods`: the DML paper) each import this module and register their
methods here; ``pyens.training`` imports both families, so the registry is complete whatever
is imported first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pyens.papers import MEMBER_NORMS as DEFAULT_NORMS  # member m is attacked in DEFAULT_NORMS[m]


@dataclass
class StepContext:
    """What a method's :meth:`Method.loss` may use for one batch.

    Attributes:
        net: the bare network (attacks run on it, so DDP never sees their backward passes).
        train_net: the network the training forward goes through (DDP-wrapped under torchrun).
        cfg: the resolved :class:`~pyens.training.config.TrainConfig`.
        generator: the run's CPU generator (MIMO input shuffles), saved in checkpoints.
        progress: fraction of training done; with ``cfg.eps_warmup > 0`` the attack radii
            and step sizes (``eps``, ``alpha``) ramp up linearly over that fraction.
    """

    net: nn.Module
    train_net: nn.Module
    cfg: object
    generator: torch.Generator
    progress: float = 1.0  # fraction of training done, for the eps warm-up

    @property
    def scale(self) -> float:
        """Radius multiplier: ramps 0 -> 1 linearly over the first ``eps_warmup`` of training."""
        w = getattr(self.cfg, "eps_warmup", 0.0)
        return 1.0 if w <= 0 else min(1.0, self.progress / w)

    @property
    def eps(self) -> tuple[float, ...]:
        return tuple(e * self.scale for e in self.cfg.eps)

    @property
    def alpha(self) -> tuple[float, ...]:
        # Steps shrink with the radius so K steps still span the (smaller) ball.
        return tuple(a * self.scale for a in self.cfg.alpha)


@dataclass
class StepOutput:
    loss: torch.Tensor
    correct: float  # correctly classified training inputs (adversarial ones for AT methods)
    seen: int       # inputs the accuracy is over


class Method:
    name: str = ""
    kind: str = "single"      # "single" | "mimo" | "ensemble"
    multi_norm: bool = False  # a single model trained against several norms (avg, max, msd)
    doc: str = ""

    def member_norms(self, norms: tuple[str, ...], members: int) -> tuple[str, ...]:
        """The per-member (or per-perturbation-type) norms for the configured ``norms``."""
        return tuple(norms) or DEFAULT_NORMS

    def members(self, norms: tuple[str, ...], members: int) -> int:
        """M: sub-models of a MIMO / ensemble, or perturbation types of avg, max and msd."""
        return len(norms) if (self.kind != "single" or self.multi_norm) else 1

    def passes(self, k: int, m: int) -> tuple[int, int]:
        raise NotImplementedError

    def build(self, cfg, data) -> nn.Module:
        """The network this method trains, for a dataset with ``data``'s shape and classes."""
        from pyens import nn as pnn

        common = dict(in_channels=data.image_shape[0], num_classes=data.num_classes, mean=data.mean, std=data.std)
        if self.kind == "single":
            return pnn.build_model(cfg.model, **common)
        if self.kind == "mimo":
            return pnn.MIMO(cfg.model, members=cfg.members, **common)
        return pnn.build_ensemble(cfg.model, members=cfg.members, **common)

    def loss(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        """Outer loss of one batch ``x: [B, C, H, W]``, ``y: [B]``."""
        raise NotImplementedError


METHODS: dict[str, Method] = {}


def register(cls):
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}{hint}")
    return METHODS[name]


def describe(cfg) -> str:
    """One line saying what a resolved config trains: the method, its network and its adversary."""
    method = get_method(cfg.method)
    parts = [f"{cfg.method}: {method.doc}"]
    if method.kind != "single":
        parts.append(f"{cfg.members} members")
    if cfg.method in ("msd", "mat_msd"):
        rule = {"example": "per example, best step (Maini et al.)",
                "batch": "per member over the batch, last step (the MAT authors' code)"}[cfg.msd_select]
        parts.append(f"MSD rule {cfg.msd_select} ({rule})")
    if method.kind == "mimo" and cfg.input_repetition:
        parts.append(f"input repetition {cfg.input_repetition:g}")
    parts.append(f"backbone {cfg.model}, {cfg.epochs} epochs, K = {cfg.steps}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# pieces every method family uses

def single_output(logits: torch.Tensor, y: torch.Tensor) -> StepOutput:
    return StepOutput(F.cross_entropy(logits, y), (logits.argmax(1) == y).sum().item(), y.numel())


def member_output(logits: torch.Tensor, y: torch.Tensor, outer: str) -> StepOutput:
    """Outer loss over members from ``logits: [B, M, K]``, ``y: [B, M]``.

    Each member's loss is its mean cross-entropy over the batch; ``sum`` adds them (MIMO
    eq. 3, MAT eq. 4), ``max`` takes the worst member (MAT Algorithm 1, ``minimize``).
    """
    b, m, c = logits.shape
    per_member = F.cross_entropy(logits.reshape(b * m, c), y.reshape(b * m), reduction="none")
    per_member = per_member.view(b, m).mean(0)
    loss = per_member.sum() if outer == "sum" else per_member.max()
    return StepOutput(loss, (logits.argmax(2) == y).sum().item(), y.numel())


def attack_mode(net: nn.Module):
    """Craft attacks with the network in eval mode.

    Batch-norm statistics then come from the running averages and are not polluted by the
    K intermediate adversarial batches; the training forward afterwards runs in train mode.
    """
    class _Mode:
        def __enter__(self):
            self.was = net.training
            net.eval()

        def __exit__(self, *exc):
            net.train(self.was)
    return _Mode()
