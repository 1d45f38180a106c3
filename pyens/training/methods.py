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

import torch
import torch.nn.functional as F

# The shared pieces live in method_base; they are re-exported here, where they were first.
from pyens.training.method_base import (  # noqa: F401
    DEFAULT_NORMS, METHODS, Method, StepContext, StepOutput, attack_mode, describe, get_method, member_output,
    register, single_output)


# ---------------------------------------------------------------------------------------------
# helpers of these methods

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
        return single_output(ctx.train_net(x), y)


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
        return member_output(ctx.train_net(xm), ym, "sum")


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
        with attack_mode(ctx.net):
            x_adv = _pgd(ctx, cfg.norms[0], ctx.eps[0], ctx.alpha[0])(x, y)
        return single_output(ctx.train_net(x_adv), y)


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
        with attack_mode(ctx.net):
            # The members share no parameters, so the summed-loss gradient of slot m IS
            # model m's own gradient: one backward per step serves all M models exactly.
            x_adv = mimo_pgd(ctx.net, xm, ym, norms=cfg.norms, eps=ctx.eps, alpha=ctx.alpha,
                             steps=cfg.steps, k=cfg.k, gradient="approx", random_start=cfg.random_start)
        return member_output(ctx.train_net(x_adv), ym, "sum")


class _MultiPerturbation(Method):
    multi_norm = True

    def passes(self, k, m):
        return m * k + m, m * k + m

    def loss(self, ctx, x, y):
        cfg = ctx.cfg
        with attack_mode(ctx.net):
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
        with attack_mode(ctx.net):
            x_adv = MSDAttack(ctx.net, norms=cfg.norms, eps=ctx.eps, alpha=ctx.alpha, steps=cfg.steps, k=cfg.k,
                              select=cfg.msd_select, k_range=cfg.k_range or None)(x, y)
        return single_output(ctx.train_net(x_adv), y)


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
        with attack_mode(ctx.net):
            x_adv = mimo_pgd(ctx.net, xm, ym, norms=cfg.norms, eps=ctx.eps, alpha=ctx.alpha, steps=cfg.steps,
                             k=cfg.k, gradient=self.gradient, random_start=cfg.random_start)
        return member_output(ctx.train_net(x_adv), ym, cfg.outer)


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
        with attack_mode(ctx.net):
            # cfg.norms has one norm per member: each competes at every step, and slot m's
            # random start (if any) is drawn from member m's own ball (the authors' code).
            x_adv = mimo_msd(ctx.net, xm, ym, norms=cfg.norms, eps=ctx.eps, alpha=ctx.alpha, steps=cfg.steps,
                             k=cfg.k, select=cfg.msd_select, random_start=cfg.random_start,
                             k_range=cfg.k_range or None)
        return member_output(ctx.train_net(x_adv), ym, cfg.outer)

