"""The distance map layer (DML) of the DML-ensemble paper: logits are negative Mahalanobis distances.

    logit_c(x) = -d_{M,c}(x) = -sqrt((x - c)^T M (x - c)),   M = F^T F          (paper eq. 2)

``F`` is the layer's factor ``P`` read as ``diag(P)`` (``form="diag"``, the paper's choice),
its lower triangle (``"tril"``, Lemma 1) or the whole matrix (``"full"``). The distances come
from the fused op :func:`pyens.ops.mahalanobis`; the randomized layer (R-DML, eq. 4-5) from
:func:`pyens.ops.randomized_mahalanobis`, which perturbs ``F`` with ``sigma`` times standard
normal ``N x N`` draws and averages ``samples`` of them. AUG-DML (Appendix A.8) perturbs the
layer's *input* instead: ``mean_t d(x + sigma z_t)``, ``z_t ~ N(0, I)``.

Entries of ``P`` may be frozen (``trainable``): the layer keeps their values in a buffer and
reads them through ``torch.where``, so no optimizer (weight decay, Adam moments) can move them.
In the paper's setting (Sec. 5) only two diagonal entries of ``M`` per member train, the
others stay at ``M_jj = 0.1``, and the centers are fixed, shuffled rows of the identity.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from pyens.checks import choice_arg, positive_int

FORMS = ("diag", "tril", "full")
CENTERS = ("identity", "1d")


def _positive(name: str, v, *, allow_zero: bool = False) -> float:
    ok = (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
          and (v > 0 or (allow_zero and v == 0)))
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0; got {v!r}")
    return float(v)


def _seed(v) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < 2**63:
        raise ValueError(f"seed must be None or an int in [0, 2**63); got {v!r}")
    return int(v)


class DistanceMap(nn.Module):
    """Distance map layer: ``x [B, N] -> logits [B, C] = -d(x, centers)`` (paper eq. 2).

    Args:
        in_features: N, the embedding the backbone produces.
        num_classes: C, one center per class.
        form: ``"diag"`` (``M = diag(P^2)``, ``P: [N]``), ``"tril"`` (``M = L^T L`` with ``L``
            the lower triangle of ``P: [N, N]``) or ``"full"`` (``M = P^T P``).
        trainable: which entries of ``P`` train: ``"all"`` (the lower triangle for
            ``"tril"``), ``"none"``, a sequence of diagonal indices (the paper's ``I_k``), or
            a bool mask of ``P``'s shape. The others keep their initial value.
        init: the initial diagonal of ``M``: ``"uniform"`` (``M_jj ~ U(0, 1)``, Sec. 3.2) or
            a number ``> 0``; off-diagonal entries of ``P`` start at 0.
        fixed: the value of ``M_jj`` for the diagonal entries that do not train (the paper's
            0.1); ``None`` keeps ``init``'s value.
        centers: ``"identity"`` (class c at the unit vector ``e_{perm[c]}``; needs
            ``N >= C``), ``"1d"`` (Appendix A.5: ``N = 1``, class c at ``perm[c]``) or a tensor
            ``[C, N]``.
        permutation: ``perm`` above (``C`` distinct ints, axes in ``[0, N)`` for
            ``"identity"``, positions in ``[0, C)`` for ``"1d"``); ``None`` draws a random
            shuffle from ``generator``. Ignored for tensor centers.
        train_centers: learn the centers (default: fixed buffers, as in the paper).
        randomized: R-DML (eq. 4-5): ``F + sigma Z`` averaged over ``samples`` draws.
        augment: AUG-DML (A.8): the input plus ``sigma`` Gaussian noise, averaged over
            ``samples`` draws. Exclusive with ``randomized``.
        sigma, samples: noise scale (``>= 0``) and Monte-Carlo draws T (``>= 1``).
        seed: the draws' seed: ``None`` draws fresh noise each call (from torch's global RNG,
            so ``torch.manual_seed`` reproduces a run); an int gives the same draws every call.
        eps: added under the square root (finite gradient at ``x = c``).
        generator: RNG for ``init="uniform"`` and the default permutation.

    The layer runs in ``P``'s dtype; ``x`` must match it (``.double()`` the module for float64).
    """

    def __init__(self, in_features: int, num_classes: int, *, form: str = "diag",
                 trainable: str | Sequence[int] | torch.Tensor = "all", init: str | float = "uniform",
                 fixed: float | None = None, centers: str | torch.Tensor = "identity",
                 permutation: Sequence[int] | torch.Tensor | None = None, train_centers: bool = False,
                 randomized: bool = False, augment: bool = False, sigma: float = 0.1, samples: int = 20,
                 seed: int | None = None, eps: float = 1e-12, generator: torch.Generator | None = None):
        super().__init__()
        n = positive_int(in_features, "in_features")
        c = positive_int(num_classes, "num_classes")
        choice_arg(form, "form", FORMS)
        self.in_features, self.num_classes, self.form = n, c, form
        self.eps = _positive("eps", eps, allow_zero=True)
        self.set_variant("rdml" if randomized else "aug" if augment else "dml", sigma=sigma, samples=samples,
                         seed=seed, _both=bool(randomized and augment))

        mask = self._mask(trainable)
        m0 = self._init_diagonal(init, generator)
        if fixed is not None:
            fixed = _positive("fixed", fixed)
            frozen_diag = ~(mask.diagonal() if form != "diag" else mask)
            m0 = torch.where(frozen_diag, torch.full_like(m0, fixed), m0)
        p0 = m0.sqrt() if form == "diag" else torch.diag(m0.sqrt())
        # weight trains; frozen_weight holds the values the mask freezes (never seen by an optimizer).
        self.weight = nn.Parameter(p0.clone(), requires_grad=bool(mask.any()))
        self.register_buffer("frozen_weight", p0.clone())
        self.register_buffer("mask", mask)
        self.register_buffer("permutation", torch.empty(0, dtype=torch.long))
        cen = self._centers(centers, permutation, generator)
        if train_centers:
            self.centers = nn.Parameter(cen)
        else:
            self.register_buffer("centers", cen)

    # -- construction ----------------------------------------------------------------------------
    def _mask(self, trainable) -> torch.Tensor:
        n, shape = self.in_features, (self.in_features,) if self.form == "diag" else (self.in_features,) * 2
        if isinstance(trainable, torch.Tensor):
            if trainable.dtype != torch.bool or tuple(trainable.shape) != shape:
                raise ValueError(f"trainable: a mask must be a bool tensor of P's shape {list(shape)}; "
                                 f"got {trainable.dtype} {list(trainable.shape)}")
            mask = trainable.clone()
        elif isinstance(trainable, str):
            if trainable not in ("all", "none"):
                raise ValueError(f"trainable must be 'all', 'none', diagonal indices or a bool mask; got {trainable!r}")
            mask = torch.full(shape, trainable == "all", dtype=torch.bool)
        else:
            idx = list(trainable)
            if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < n for i in idx) \
                    or len(set(idx)) != len(idx):
                raise ValueError(f"trainable: diagonal indices must be distinct ints in [0, {n}); got {idx!r}")
            diag = torch.zeros(n, dtype=torch.bool)
            diag[idx] = True
            mask = diag if self.form == "diag" else torch.diag(diag)
        if self.form == "tril":
            mask = mask.tril()  # the op ignores the upper triangle
        return mask

    def _init_diagonal(self, init, generator) -> torch.Tensor:
        if isinstance(init, str):
            if init != "uniform":
                raise ValueError(f"init must be 'uniform' or a number > 0; got {init!r}")
            return torch.rand(self.in_features, generator=generator)
        return torch.full((self.in_features,), _positive("init", init))

    def _centers(self, centers, permutation, generator) -> torch.Tensor:
        n, c = self.in_features, self.num_classes
        if isinstance(centers, torch.Tensor):
            if tuple(centers.shape) != (c, n) or not centers.is_floating_point():
                raise ValueError(f"centers: a tensor must be floating [C, N] = [{c}, {n}]; got "
                                 f"{centers.dtype} {list(centers.shape)}")
            return centers.detach().to(torch.float32).clone()
        if centers not in CENTERS:
            raise ValueError(f"centers must be one of {CENTERS} or a [C, N] tensor; got {centers!r}")
        slots = n if centers == "identity" else c
        if centers == "identity" and n < c:
            raise ValueError(f"centers='identity' needs in_features >= num_classes; got {n} < {c}")
        if centers == "1d" and n != 1:
            raise ValueError(f"centers='1d' needs in_features == 1; got {n}")
        if permutation is None:
            perm = torch.randperm(slots, generator=generator)[:c]
        else:
            given = torch.as_tensor(permutation).flatten()
            if given.is_floating_point() or given.is_complex() or given.dtype == torch.bool:
                raise ValueError(f"permutation must hold ints; got {given.dtype}")  # 1.7 must not become 1
            perm = given.long()
            if perm.numel() != c or perm.unique().numel() != c or perm.min() < 0 or perm.max() >= slots:
                raise ValueError(f"permutation must hold {c} distinct ints in [0, {slots}); got {perm.tolist()}")
        self.permutation = perm
        if centers == "1d":
            return perm.to(torch.float32).unsqueeze(1)
        return torch.eye(n)[perm]

    # -- variants ----------------------------------------------------------------------------------
    def set_variant(self, variant: str, *, sigma: float | None = None, samples: int | None = None,
                    seed: int | None = None, _both: bool = False) -> DistanceMap:
        """Switch between ``"dml"``, ``"rdml"`` (eq. 4-5) and ``"aug"`` (A.8) in place; returns self.

        ``sigma``/``samples`` keep their current value when ``None``; ``seed`` is always set.
        """
        if _both:
            raise ValueError("randomized and augment are exclusive: R-DML perturbs M, AUG-DML the input")
        if variant not in ("dml", "rdml", "aug"):
            raise ValueError(f"variant must be 'dml', 'rdml' or 'aug'; got {variant!r}")
        self.variant = variant
        self.sigma = _positive("sigma", sigma if sigma is not None else self.sigma, allow_zero=True)
        self.samples = positive_int(samples if samples is not None else self.samples, "samples")
        self.seed = _seed(seed)
        return self

    @property
    def randomized(self) -> bool:
        return self.variant == "rdml"

    @property
    def augment(self) -> bool:
        return self.variant == "aug"

    # -- the matrix M ------------------------------------------------------------------------------
    def factor(self) -> torch.Tensor:
        """``P`` with the frozen entries read from their buffer: ``[N]`` (diag) or ``[N, N]``."""
        if bool(self.mask.all()):
            return self.weight
        return torch.where(self.mask, self.weight, self.frozen_weight)

    def metric(self) -> torch.Tensor:
        """``M = F^T F`` as a dense ``[N, N]`` matrix (differentiable in the trainable entries)."""
        p = self.factor()
        if self.form == "diag":
            return torch.diag(p * p)
        f = p.tril() if self.form == "tril" else p
        return f.transpose(0, 1) @ f

    def metric_mask(self) -> torch.Tensor:
        """``[N, N]`` bool: the entries of ``M`` that count as trainable (``M_{I_k}`` of eq. 3).

        ``diag``: the diagonal entries whose ``P_j`` trains; ``tril``/``full``: the trainable
        positions of ``P`` read as positions of ``M``.
        """
        return torch.diag(self.mask) if self.form == "diag" else self.mask

    def l1(self) -> torch.Tensor:
        """``||M_{I}||_1``: the l1 norm of the trainable entries of ``M`` (eq. 3's last term)."""
        return self.metric().abs().masked_select(self.metric_mask()).sum()

    def own_classes(self) -> torch.Tensor:
        """``[C]`` bool: classes whose center is a unit vector along a trainable diagonal axis.

        These are the labels the meta-model (Sec. 3.3) ignores in this layer's vote.
        """
        hot = self.centers.detach()
        unit = (hot.abs().sum(1) == 1) & (hot.amax(1) == 1)
        if self.in_features == 1 or not bool(unit.any()):
            return torch.zeros(self.num_classes, dtype=torch.bool, device=hot.device)
        axes = hot.argmax(1)
        diag = self.mask if self.form == "diag" else self.mask.diagonal()
        return unit & diag[axes]

    # -- forward -----------------------------------------------------------------------------------
    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """``d [B, C]``: the (randomized / augmented) Mahalanobis distances of ``x [B, N]``."""
        from pyens.ops import mahalanobis, randomized_mahalanobis

        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must be [B, in_features={self.in_features}]; got shape {tuple(x.shape)}")
        # Checked here, not only by the op: AUG-DML draws noise of x's dtype and device first
        # (an integer x made torch.randn raise a RuntimeError).
        if x.dtype != self.weight.dtype:
            raise TypeError(f"x must have the layer's dtype {self.weight.dtype} (convert the layer, e.g. "
                            f".double(), for another); got {x.dtype}")
        if x.device != self.weight.device:
            raise ValueError(f"x must be on the layer's device {self.weight.device}; got {x.device}")
        p, cen = self.factor().unsqueeze(0), self.centers.unsqueeze(0)
        if self.variant == "rdml":
            return randomized_mahalanobis(x, p, cen, sigma=self.sigma, samples=self.samples, seed=self.seed,
                                          form=self.form, eps=self.eps)[:, 0]
        if self.variant == "aug":
            g = None if self.seed is None else torch.Generator(device=x.device).manual_seed(self.seed)
            noise = torch.randn((self.samples, *x.shape), generator=g, device=x.device, dtype=x.dtype)
            xs = (x.unsqueeze(0) + self.sigma * noise).flatten(0, 1)
            d = mahalanobis(xs, p, cen, form=self.form, eps=self.eps)[:, 0]
            return d.view(self.samples, x.shape[0], d.shape[-1]).mean(0)  # not -1: B may be 0
        return mahalanobis(x, p, cen, form=self.form, eps=self.eps)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.distances(x)

    def extra_repr(self) -> str:
        noise = "" if self.variant == "dml" else f", {self.variant}(sigma={self.sigma}, samples={self.samples})"
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, form={self.form!r}, "
                f"trainable={int(self.mask.sum())}/{self.mask.numel()}{noise}")
