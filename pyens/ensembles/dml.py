"""DML ensembles (DML paper Sec. 3): K backbones, each followed by its own distance map layer.

    net = DMLEnsemble(members=5, backbone="lenet", in_channels=1, num_classes=10, mean=ds.mean, std=ds.std)
    z = net.member_logits(x)                 # [B, M, K], logits -d of every member
    s = net.ensemble(x)                      # [B, K], summed logits: what white-box attacks target (A.3)
    v = net.ensemble(x, average="vote")      # [B, K], argmax = majority vote of top-1 (the paper's decision)
    loss = sum_k CE_k + net.penalty(gamma=0.01, beta=0.01)                        # eq. (3)

Diversity comes from three choices made at construction (Sec. 3.1-3.3, Sec. 5):

* centers: class c of member k sits at the unit vector ``e_{pi_k(c)}``, ``pi_k`` a per-member
  shuffle, fixed;
* trainable entries: member k trains the diagonal entries ``I_k`` of its ``M`` (two of ten for
  MNIST), the rest stay at ``M_jj = 0.1``; the ``I_k`` are disjoint, and so are the label sets
  ``L_k = pi_k^{-1}(I_k)`` (each member's *own* labels, whose centers lie on its trainable
  axes): labels are partitioned into groups ``L_k``, axes into groups ``I_k``, and ``pi_k``
  maps ``L_k`` onto ``I_k``;
* the loss (eq. 3): ``gamma sum_{k != t} ||M_k M_t||_F`` pushes the members' M matrices
  towards orthogonality and ``beta sum_k ||M_{I_k}||_1`` keeps their Lipschitz constant small.

The members are separate modules (:class:`DMLMember`) of a :class:`pyens.nn.Ensemble`, so
training, pass counting and transfer attacks treat a DML ensemble as any vanilla ensemble.
Each member's DML is one call of the fused op; a LeNet backbone's forward and backward cost
two orders of magnitude more (measured: 1 ms vs 150 ms for 250 MNIST images on one core).
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from pyens.ensembles.consensus import RULES, consensus
from pyens.checks import choice_arg, positive_int
from pyens.nn.backbones import BackboneFactory, build_backbone
from pyens.nn.distance_map import CENTERS, DistanceMap
from pyens.nn.ensemble import Ensemble
from pyens.nn.normalize import Normalize


class DMLMember(nn.Sequential):
    """One member: :class:`Normalize`, a backbone ``-> [B, N]`` and a :class:`DistanceMap` ``-> [B, K]``."""

    def __init__(self, normalize: Normalize, backbone: nn.Module, dml: DistanceMap, *, in_channels: int):
        super().__init__(OrderedDict(normalize=normalize, backbone=backbone, dml=dml))
        self.in_channels, self.num_classes = in_channels, dml.num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding ``[B, N]`` the DML maps to distances."""
        return self.backbone(self.normalize(x))


def dml_layout(members: int, num_classes: int, embedding: int, per_member: int,
               generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, list[int]]]:
    """Per member ``(pi_k [K], I_k)``: class -> center axis, and the trainable diagonal axes.

    Labels are split into disjoint groups ``L_k`` of ``per_member`` labels and axes into
    disjoint groups ``I_k``; ``pi_k`` maps ``L_k`` onto ``I_k`` (random order) and the other
    labels onto random other axes, so the ``I_k`` are disjoint and so are the own labels.
    """
    if per_member < 0 or members * per_member > num_classes:
        raise ValueError(f"trainable: {members} members x {per_member} entries exceed the {num_classes} classes; "
                         f"use at most {num_classes // members} per member")
    labels = torch.randperm(num_classes, generator=generator)
    axes = torch.randperm(embedding, generator=generator)
    out = []
    for k in range(members):
        own_labels = labels[k * per_member:(k + 1) * per_member]
        own_axes = axes[k * per_member:(k + 1) * per_member]
        own_axes = own_axes[torch.randperm(per_member, generator=generator)]
        rest_labels = torch.tensor([c for c in range(num_classes) if c not in set(own_labels.tolist())])
        rest_axes = torch.tensor([a for a in range(embedding) if a not in set(own_axes.tolist())], dtype=torch.long)
        rest_axes = rest_axes[torch.randperm(len(rest_axes), generator=generator)][:len(rest_labels)]
        perm = torch.empty(num_classes, dtype=torch.long)
        perm[own_labels] = own_axes
        if len(rest_labels):
            perm[rest_labels] = rest_axes
        out.append((perm, sorted(own_axes.tolist())))
    return out


class DMLEnsemble(Ensemble):
    """An ensemble of ``members`` backbones with diversified distance map layers (Sec. 3).

    Args:
        members: K (the paper: 5).
        backbone: a name of :data:`pyens.nn.BACKBONES` (``"lenet"``, ``"resnet18"``) or a
            factory ``(in_channels, out_features)``; it maps images to the embedding R^N.
        in_channels, num_classes: the data's channels and classes (C and K).
        mean, std: the data's per-channel statistics (default: no normalisation).
        embedding: N (default: K for ``"identity"`` centers, 1 for ``"1d"``).
        form: the DML's ``M`` parametrisation (:class:`~pyens.nn.DistanceMap`; the paper: diag).
        trainable: entries of ``M`` each member trains: ``None`` = ``K // members`` diagonal
            entries (the paper's two of ten), an int per member, ``"all"`` or ``"none"``.
        init: initial diagonal of ``M`` (``"uniform"``: U(0, 1)); fixed: value of the frozen
            diagonal entries (0.1).
        centers: ``"identity"`` (shuffled unit vectors) or ``"1d"`` (A.5: shuffled positions
            ``0..K-1`` on a line; ``M`` is a trainable scalar per member).
        train_centers: learn the centers (default fixed, as the paper).
        randomized, augment, sigma, samples: R-DML / AUG-DML (see :class:`~pyens.nn.DistanceMap`).
        seed: seed of the layout (shuffles, trainable sets) and of ``init``.

    Member logits ``[B, M, K]`` come from ``forward(x [B, M, C, H, W])`` (training: slot m to
    member m) or ``member_logits(x [B, C, H, W])``; ``ensemble(x, average=rule)`` applies a
    consensus rule (default ``"sum"``, the attack surrogate; ``"vote"``, the decision).
    """

    def __init__(self, members: int = 5, backbone: str | BackboneFactory = "lenet", *, in_channels: int = 1,
                 num_classes: int = 10, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 embedding: int | None = None, form: str = "diag", trainable: int | str | None = None,
                 init: str | float = "uniform", fixed: float | None = 0.1, centers: str = "identity",
                 train_centers: bool = False, randomized: bool = False, augment: bool = False, sigma: float = 0.1,
                 samples: int = 20, seed: int = 0):
        m = positive_int(members, "members")
        k = positive_int(num_classes, "num_classes")
        positive_int(in_channels, "in_channels")
        choice_arg(centers, "centers", CENTERS)
        n = positive_int(embedding, "embedding") if embedding is not None else (k if centers == "identity" else 1)
        if centers == "1d" and n != 1:
            raise ValueError(f"centers='1d' needs embedding 1; got {n}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be an int >= 0; got {seed!r}")
        per_member = self._per_member(trainable, m, k, centers)
        g = torch.Generator().manual_seed(int(seed))
        if per_member is None:  # "all" / "none": every or no entry trains, shuffles only
            layout = [(None, "all" if trainable == "all" else "none") for _ in range(m)]
        else:
            layout = dml_layout(m, k, n, per_member, g)
        mean = (0.0,) * in_channels if mean is None else mean
        std = (1.0,) * in_channels if std is None else std
        models = []
        for perm, train in layout:
            dml = DistanceMap(n, k, form=form, trainable=train, init=init, fixed=fixed, centers=centers,
                              permutation=perm, train_centers=train_centers, randomized=randomized,
                              augment=augment, sigma=sigma, samples=samples, generator=g)
            models.append(DMLMember(Normalize(mean, std), build_backbone(backbone, in_channels=in_channels,
                                                                         num_classes=n), dml,
                                    in_channels=in_channels))
        super().__init__(models, num_classes=k)
        self.embedding = n
        self.index_sets = [sorted(train) if isinstance(train, list) else train for _, train in layout]

    @staticmethod
    def _per_member(trainable, members: int, classes: int, centers: str) -> int | None:
        if trainable in ("all", "none"):
            return None
        if centers == "1d":
            raise ValueError("trainable: with centers='1d' M is 1x1; use 'all' or 'none'")
        if trainable is None:
            return classes // members
        if isinstance(trainable, bool) or not isinstance(trainable, numbers.Integral) or trainable < 0:
            raise ValueError(f"trainable must be None, an int >= 0 per member, 'all' or 'none'; got {trainable!r}")
        return int(trainable)

    # -- parts -------------------------------------------------------------------------------------
    @property
    def dmls(self) -> list[DistanceMap]:
        return [model.dml for model in self.models]

    @property
    def own_classes(self) -> torch.Tensor:
        """``[M, K]`` bool: each member's own labels (centers on its trainable axes; Sec. 3.3)."""
        return torch.stack([d.own_classes() for d in self.dmls])

    def embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's embedding ``[B, M, N]`` of ``x [B, C, H, W]``."""
        self._check_single(x)
        return torch.stack([model.features(x) for model in self.models], dim=1)

    def set_variant(self, variant: str, *, sigma: float | None = None, samples: int | None = None,
                    seed: int | None = None) -> DMLEnsemble:
        """Every member's DML to ``"dml"``, ``"rdml"`` or ``"aug"`` (member k seeded ``seed + k``)."""
        for i, d in enumerate(self.dmls):
            d.set_variant(variant, sigma=sigma, samples=samples, seed=None if seed is None else seed + i)
        return self

    # -- eq. (3) -----------------------------------------------------------------------------------
    def metrics(self) -> torch.Tensor:
        """The members' ``M`` matrices ``[M, N, N]``."""
        return torch.stack([d.metric() for d in self.dmls])

    def orthogonality(self) -> torch.Tensor:
        """``sum_{k != t} ||M_k M_t||_F`` over ordered pairs (eq. 3's second term, without gamma)."""
        mats = self.metrics()
        k, t = torch.triu_indices(len(mats), len(mats), offset=1)  # unordered pairs k < t
        # ||M_t M_k|| = ||(M_k M_t)^T|| for symmetric M: each unordered pair counts twice.
        return 2 * torch.linalg.matrix_norm(mats[k] @ mats[t]).sum()

    def l1(self) -> torch.Tensor:
        """``sum_k ||M_{I_k}||_1`` (eq. 3's third term, without beta)."""
        return torch.stack([d.l1() for d in self.dmls]).sum()

    def penalty(self, gamma: float, beta: float) -> torch.Tensor:
        """``gamma * orthogonality() + beta * l1()``: what eq. 3 adds to the members' CE."""
        return gamma * self.orthogonality() + beta * self.l1()

    # -- consensus and detection -------------------------------------------------------------------
    def ensemble(self, x: torch.Tensor, *, average: str = "sum") -> torch.Tensor:
        """Ensemble scores ``[B, K]`` under the consensus rule ``average`` (:data:`RULES`).

        The default, ``"sum"``, is the differentiable surrogate white-box attacks target
        (A.3); ``"vote"`` is the paper's decision, ``"meta"`` the meta-model.
        """
        choice_arg(average, "average", RULES)
        own = self.own_classes if average == "meta" else None
        return consensus(self.member_logits(x), average, own=own)

    def detect(self, x: torch.Tensor, *, nu: int | str = "majority") -> torch.Tensor:
        """``[B]`` bool: flagged as adversarial, fewer than ``nu`` members agree (A.4, eq. 8).

        ``nu``: ``"majority"`` (``floor(M/2) + 1``), ``"unanimity"`` (M) or an int in [1, M].
        """
        from pyens.ensembles.detection import detect

        with torch.no_grad():
            return detect(self.member_logits(x), nu=nu)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, embedding={self.embedding}, index_sets={self.index_sets}"
