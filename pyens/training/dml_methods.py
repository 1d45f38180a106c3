"""Training methods of the DML paper: ``dml`` (eq. 3), ``dml_at`` (A.8) and the baseline ``ensemble``.

| method | network | inner maximisation | passes per batch (forward, backward) |
| --- | --- | --- | --- |
| ensemble | M models, plain CE (the paper's baseline) | none | M, M |
| dml | :class:`~pyens.ensembles.DMLEnsemble`, eq. 3 | none | M, M |
| dml_at | DMLEnsemble, eq. 3 on FGSM inputs | FGSM on each member's own loss, no random init | 2M, 2M |

Every member sees the same batch. DML settings live in the config's ``[extra]`` table
(:class:`DMLSettings`); the baseline ignores them, so one config file trains both.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from pyens.checks import choice_arg
from pyens.training.method_base import Method, StepOutput, attack_mode, member_output, register

VARIANTS = ("dml", "rdml", "aug")


@dataclass(frozen=True)
class DMLSettings:
    """The ``[extra]`` keys of a DML run (defaults: the paper's Sec. 5 setting).

    Attributes:
        gamma, beta: weights of the orthogonality and l1 terms of eq. 3 (0.01, 0.01).
        form: ``"diag"``, ``"tril"`` or ``"full"`` (:class:`pyens.nn.DistanceMap`).
        trainable: diagonal entries of ``M`` each member trains (``-1`` = ``K // M``, the
            paper's 2 of 10), or ``"all"`` / ``"none"``.
        init: initial diagonal of ``M``: ``"uniform"`` (U(0, 1)) or a number.
        fixed: ``M_jj`` of the frozen diagonal entries (0.1), or ``"none"`` to keep ``init``.
        centers: ``"identity"`` (shuffled unit vectors) or ``"1d"`` (A.5).
        embedding: N, the backbone's output size (0 = K, or 1 for ``"1d"``).
        train_centers: learn the centers (the paper: fixed).
        variant: ``"dml"``, ``"rdml"`` (R-DML, eq. 4-5) or ``"aug"`` (AUG-DML, A.8), in training
            and evaluation; sigma, samples: their noise scale and draws.
        layout_seed: seed of the center shuffles and trainable sets (-1 = the run's seed).
    """

    gamma: float = 0.01
    beta: float = 0.01
    form: str = "diag"
    trainable: int | str = -1
    init: str | float = "uniform"
    fixed: float | str = 0.1
    centers: str = "identity"
    embedding: int = 0
    train_centers: bool = False
    variant: str = "dml"
    sigma: float = 0.1
    samples: int = 20
    layout_seed: int = -1

    @classmethod
    def from_config(cls, cfg) -> DMLSettings:
        extra = dict(getattr(cfg, "extra", None) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"extra: unknown DML settings {unknown}; known: {sorted(known)}")
        s = cls(**extra)
        for name in ("gamma", "beta", "sigma"):
            v = getattr(s, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ValueError(f"extra.{name} must be a finite number >= 0; got {v!r}")
        choice_arg(s.variant, "extra.variant", VARIANTS)
        if not (s.trainable in ("all", "none") or (isinstance(s.trainable, int) and not isinstance(s.trainable, bool)
                                                   and s.trainable >= -1)):
            raise ValueError(f"extra.trainable must be -1 (K // members), an int >= 0, 'all' or 'none'; "
                             f"got {s.trainable!r}")
        if not (s.fixed == "none" or (isinstance(s.fixed, numbers.Real) and not isinstance(s.fixed, bool))):
            raise ValueError(f"extra.fixed must be a number > 0 or 'none'; got {s.fixed!r}")
        for name in ("embedding", "samples", "layout_seed"):
            v = getattr(s, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"extra.{name} must be an int; got {v!r}")
        return s

    def network(self, cfg, data):
        """The :class:`~pyens.ensembles.DMLEnsemble` these settings describe for ``cfg`` and ``data``."""
        from pyens.ensembles import DMLEnsemble

        return DMLEnsemble(
            cfg.members, cfg.model, in_channels=data.image_shape[0], num_classes=data.num_classes,
            mean=data.mean, std=data.std, embedding=self.embedding or None, form=self.form,
            trainable=None if self.trainable == -1 else self.trainable, init=self.init,
            fixed=None if self.fixed == "none" else self.fixed, centers=self.centers,
            train_centers=self.train_centers, randomized=self.variant == "rdml", augment=self.variant == "aug",
            sigma=self.sigma, samples=self.samples, seed=cfg.seed if self.layout_seed < 0 else self.layout_seed)


def _same_input(x, y, members: int):
    """Every member's slot holds the batch: ``[B, M, C, H, W]``, ``[B, M]`` (views, no copy)."""
    return x.unsqueeze(1).expand(-1, members, *x.shape[1:]), y.unsqueeze(1).expand(-1, members)


class _MemberMethod(Method):
    """M networks trained side by side on the same batches; no attack norms (FGSM is linf)."""

    kind = "ensemble"

    def members(self, norms, members):
        return members

    def member_norms(self, norms, members):
        norms = tuple(norms) or ("linf",)
        if set(norms) != {"linf"}:
            raise ValueError(f"norms: method {self.name!r} uses linf only (FGSM); got {norms}")
        return ("linf",) * members

    def passes(self, k, m):
        return m, m


@register
class PlainEnsemble(_MemberMethod):
    name, doc = "ensemble", "M separate models, each trained with plain cross-entropy (the DML paper's baseline)"

    def loss(self, ctx, x, y):
        xm, ym = _same_input(x, y, ctx.cfg.members)
        return member_output(ctx.train_net(xm), ym, "sum")


@register
class DML(_MemberMethod):
    name, doc = "dml", "DML ensemble: sum of member CE + gamma orthogonality + beta l1 (DML paper eq. 3)"

    def build(self, cfg, data):
        return DMLSettings.from_config(cfg).network(cfg, data)

    def inputs(self, ctx, xm, ym):
        return xm

    def loss(self, ctx, x, y):
        s = DMLSettings.from_config(ctx.cfg)
        xm, ym = _same_input(x, y, ctx.cfg.members)
        out = member_output(ctx.train_net(self.inputs(ctx, xm, ym)), ym, "sum")
        return StepOutput(out.loss + ctx.net.penalty(s.gamma, s.beta), out.correct, out.seen)


@register
class DMLAT(DML):
    name = "dml_at"
    doc = "DML ensemble on FGSM inputs (A.8): each member's own FGSM step of size eps, no random init"

    def passes(self, k, m):
        return 2 * m, 2 * m

    def inputs(self, ctx, xm, ym):
        from pyens.attacks import mimo_pgd

        eps = ctx.eps[0]  # the radius after the optional eps warm-up
        with attack_mode(ctx.net):
            # Members share no parameters: slot m of the summed-loss gradient is member m's own.
            return mimo_pgd(ctx.net, xm.contiguous(), ym.contiguous(), norms="linf", eps=eps, alpha=eps, steps=1,
                            random_start=False)
