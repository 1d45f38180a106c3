"""The training methods of the MAT paper and its baselines, one small class each.

A method says which network it trains (a single model, a MIMO network, or a vanilla ensemble
of M models), how its inner maximisation crafts the training inputs, and its outer loss.
Its pass count per batch is the paper's Table 6; ``tests/test_training.py`` checks the
counted passes against :meth:`Method.passes`.

| method | network | inner maximisation | Table 6 (forward, backward) |
| --- | --- | --- | --- |
| standard | single | none | 1, 1 |
| mimo | MIMO | none (M shuffles of the batch) | 1, 1 |
| at | single | PGD, one norm (Madry et al.) | K+1, K+1 |
| ensemble_at | M models | PGD, member m on norm m | M(K+1), M(K+1) |
| avg / max | single | PGD on each of M norms (Tramèr & Boneh) | MK+M, MK+M |
| msd | single | MSD over M norms (Maini et al.) | (1+M)K+1, K+1 |
| mimo_at | MIMO | PGD with true per-member gradients (eq. 5) | K+1, MK+1 |
| mat | MIMO | PGD with the summed-loss gradient (eq. 6) | K+1, K+1 |
| mat_msd | MIMO | MSD on every member, summed-loss gradient | (1+M)K+1, K+1 |
| mat_same | MIMO | as mat, every member on one norm (Table 8) | K+1, K+1 |
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_NORMS = ("l1", "l2", "linf")


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
# shared pieces

def _single_output(logits: torch.Tensor, y: torch.Tensor) -> StepOutput:
    return StepOutput(F.cross_entropy(logits, y), (logits.argmax(1) == y).sum().item(), y.numel())


def _member_output(logits: torch.Tensor, y: torch.Tensor, outer: str) -> StepOutput:
    """Outer loss over members from ``logits: [B, M, K]``, ``y: [B, M]``.

    Each member's loss is its mean cross-entropy over the batch; ``sum`` adds them (MIMO
    eq. 3, MAT eq. 4), ``max`` takes the worst member (MAT Algorithm 1, ``minimize``).
    """
    b, m, c = logits.shape
    per_member = F.cross_entropy(logits.reshape(b * m, c), y.reshape(b * m), reduction="none")
    per_member = per_member.view(b, m).mean(0)
    loss = per_member.sum() if outer == "sum" else per_member.max()
    return StepOutput(loss, (logits.argmax(2) == y).sum().item(), y.numel())


def _attack_mode(net: nn.Module):
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


def _repeat_members(x: torch.Tensor, y: torch.Tensor, m: int):
    return x.unsqueeze(1).expand(-1, m, *x.shape[1:]).contiguous(), y.unsqueeze(1).expand(-1, m).contiguous()


def _pgd(ctx: StepContext, norm: str, eps: float, alpha: float):
    from pyens.attacks import PGD

    cfg = ctx.cfg
    return PGD(ctx.net, norm=norm, eps=eps, alpha=alpha, steps=cfg.steps, k=cfg.k,
               random_start=cfg.random_start)


# ---------------------------------------------------------------------------------------------
# the methods

@register
class Standard(Method):
    name, doc = "standard", "plain cross-entropy training"

    def passes(self, k, m):
        return 1, 1

    def loss(self, ctx, x, y):
        return _single_output(ctx.train_net(x), y)


@register
class Mimo(Method):
    name, kind, doc = "mimo", "mimo", "plain MIMO training (Havasi et al.): M shuffles, summed loss"

    def members(self, norms, members):
        return members  # no attack: the norms play no part

    def passes(self, k, m):
        return 1, 1

    def loss(self, ctx, x, y):
        from pyens.nn import mimo_batch

        xm, ym = mimo_batch(x, y, ctx.cfg.members, generator=ctx.generator,
                            repetition=ctx.cfg.input_repetition)
        return _member_output(ctx.train_net(xm), ym, "sum")


@register
class AT(Method):
    name, doc = "at", "PGD adversarial training on one norm (Madry et al.)"

    def member_norms(self, norms, members):
        norms = tuple(norms) or ("linf",)
        if len(norms) != 1:
            raise ValueError(f"norms: method 'at' trains against one norm, got {norms}")
        return norms

    def passes(self, k, m):
        return k + 1, k + 1

    def loss(self, ctx, x, y):
        cfg = ctx.cfg
        with _attack_mode(ctx.net):
            x_adv = _pgd(ctx, cfg.norms[0], ctx.eps[0], ctx.alpha[0])(x, y)
        return _single_output(ctx.train_net(x_adv), y)


@register
class EnsembleAT(Method):
    name, kind = "ensemble_at", "ensemble"
    doc = "M separate models, model m adversarially trained on norm m"

    def passes(self, k, m):
        return m * (k + 1), m * (k + 1)

    def loss(self, ctx, x, y):
        from pyens.attacks import mimo_pgd

        cfg = ctx.cfg
        xm, ym = _repeat_members(x, y, len(cfg.norms))
        with _attack_mode(ctx.net):
            # The members share no parameters, so the summed-loss gradient of slot m IS
            # model m's own gradient: one backward per step serves all M models exactly.
            x_adv = mimo_pgd(ctx.net, xm, ym, norms=cfg.norms, eps=ctx.eps, alpha=ctx.alpha,
                             steps=cfg.steps, k=cfg.k, gradient="approx", random_start=cfg.random_start)
        return _member_output(ctx.train_net(x_adv), ym, "sum")


class _MultiPerturbation(Method):
    multi_norm = True

    def passes(self, k, m):
        return m * k + m, m * k + m

    def loss(self, ctx, x, y):
        cfg = ctx.cfg
        with _attack_mode(ctx.net):
            advs = [_pgd(ctx, p, e, a)(x, y) for p, e, a in zip(cfg.norms, ctx.eps, ctx.alpha)]
        logits = ctx.train_net(torch.cat(advs))  # one pass over the M adversarial batches
        losses = F.cross_entropy(logits, y.repeat(len(advs)), reduction="none").view(len(advs), -1)
        loss = self.reduce(losses)
        correct = (logits.argmax(1) == y.repeat(len(advs))).view(len(advs), -1).all(0).sum().item()
        return StepOutput(loss, correct, y.numel())


@register
class Avg(_MultiPerturbation):
    name, doc = "avg", "Tramèr & Boneh: mean of the losses of one PGD attack per norm"

    @staticmethod
    def reduce(losses):
        return losses.mean()


@register
class Max(_MultiPerturbation):
    name, doc = "max", "Tramèr & Boneh: per-example worst of one PGD attack per norm"

    @staticmethod
    def reduce(losses):
        return losses.max(0).values.mean()


@register
class MSD(Method):
    name, multi_norm = "msd", True
    doc = "multi steepest descent (Maini et al.): worst of the M norms' steps at every step"

    def passes(self, k, m):
        return (1 + m) * k + 1, k + 1

    def loss(self, ctx, x, y):
        from pyens.attacks import MSD as MSDAttack

        cfg = ctx.cfg
        with _attack_mode(ctx.net):
            x_adv = MSDAttack(ctx.net, norms=cfg.norms, eps=ctx.eps, alpha=ctx.alpha, steps=cfg.steps, k=cfg.k,
                              select=cfg.msd_select, k_range=cfg.k_range or None)(x, y)
        return _single_output(ctx.train_net(x_adv), y)


class _MimoAdversarial(Method):
    kind = "mimo"
    gradient = "approx"

    def passes(self, k, m):
        return k + 1, (m * k + 1 if self.gradient == "naive" else k + 1)

    def loss(self, ctx, x, y):
        from pyens.attacks import mimo_pgd
        from pyens.nn import mimo_batch

        cfg = ctx.cfg
        xm, ym = mimo_batch(x, y, cfg.members, generator=ctx.generator, repetition=cfg.input_repetition)
        with _attack_mode(ctx.net):
            x_adv = mimo_pgd(ctx.net, xm, ym, norms=cfg.norms, eps=ctx.eps, alpha=ctx.alpha, steps=cfg.steps,
                             k=cfg.k, gradient=self.gradient, random_start=cfg.random_start)
        return _member_output(ctx.train_net(x_adv), ym, cfg.outer)


@register
class MimoAT(_MimoAdversarial):
    name, gradient = "mimo_at", "naive"
    doc = "MIMO AT with each member's true gradient (eq. 5): M backward passes per PGD step"


@register
class MAT(_MimoAdversarial):
    name = "mat"
    doc = ("MAT as the paper's text states it (eq. 6, Algorithm 1): member m trained by PGD in norm m only, "
           "one backward per step; not robust to the union of norms (docs/training.md)")


@register
class MATSame(_MimoAdversarial):
    name = "mat_same"
    doc = "MAT with every member on the same norm (MAT(linf), MAT(l2) of Table 8)"

    def member_norms(self, norms, members):
        norms = tuple(norms) or ("linf",)
        if len(set(norms)) != 1:
            raise ValueError(f"norms: method 'mat_same' trains every member on one norm, got {norms}")
        return (norms[0],) * members


@register
class MATMSD(Method):
    name, kind = "mat_msd", "mimo"
    doc = ("MAT as its authors' code trains it: a MIMO ensemble whose every member meets the worst of the norms "
           "at each PGD step (MSD; --msd-select example or batch); the main job")

    def passes(self, k, m):
        return (1 + m) * k + 1, k + 1

    def loss(self, ctx, x, y):
        from pyens.attacks import mimo_msd
        from pyens.nn import mimo_batch

        cfg = ctx.cfg
        xm, ym = mimo_batch(x, y, cfg.members, generator=ctx.generator, repetition=cfg.input_repetition)
        with _attack_mode(ctx.net):
            # cfg.norms has one norm per member: each competes at every step, and slot m's
            # random start (if any) is drawn from member m's own ball (the authors' code).
            x_adv = mimo_msd(ctx.net, xm, ym, norms=cfg.norms, eps=ctx.eps, alpha=ctx.alpha, steps=cfg.steps,
                             k=cfg.k, select=cfg.msd_select, random_start=cfg.random_start,
                             k_range=cfg.k_range or None)
        return _member_output(ctx.train_net(x_adv), ym, cfg.outer)


from pyens.training import dml_methods  # noqa: E402,F401  (registers dml, dml_at, ensemble)
