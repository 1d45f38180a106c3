"""Adversary detection with an ensemble (DML paper A.4, A.5.1).

* Agreement (eq. 8): the ensemble answers only when at least ``nu`` members' top-1 agree,
  otherwise it flags the input. ``nu = floor(M/2) + 1`` is the majority framework, ``nu = M``
  unanimity. :func:`disagreement` (``M`` minus the largest agreement) is the score whose
  thresholds are these frameworks, so its ROC curve covers every ``nu`` at once.
* Uncertainty (A.5.1): the variance of the members' softmax outputs across members and across
  R-DML draws (``F + sigma Z``, one draw per pass), averaged over classes;
  :class:`UncertaintyDetector` fits a logistic regression on these features (benign and noisy
  inputs negative, adversarial ones positive) and reports ROC and AUC.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from pyens.ensembles.consensus import votes

FEATURES = ("member_var", "draw_var", "total_var")


def resolve_nu(nu: int | str, members: int) -> int:
    """``nu`` as an int: ``"majority"`` -> ``floor(M/2) + 1``, ``"unanimity"`` -> M, or an int in [1, M]."""
    if nu == "majority":
        return members // 2 + 1
    if nu == "unanimity":
        return members
    if isinstance(nu, bool) or not isinstance(nu, int) or not 1 <= nu <= members:
        raise ValueError(f"nu must be 'majority', 'unanimity' or an int in [1, {members}]; got {nu!r}")
    return nu


def agreement(z: torch.Tensor) -> torch.Tensor:
    """``[B]`` int: the number of members whose top-1 is the most voted class (``z: [B, M, K]``)."""
    return votes(z).amax(-1).round().long()


def disagreement(z: torch.Tensor) -> torch.Tensor:
    """``[B]`` float: ``M - agreement(z)``; flagging ``disagreement > M - nu`` is :func:`detect`."""
    return (z.shape[1] - agreement(z)).float()


def detect(z: torch.Tensor, *, nu: int | str = "majority") -> torch.Tensor:
    """``[B]`` bool: True where fewer than ``nu`` members agree (flagged as adversarial, eq. 8)."""
    return agreement(z) < resolve_nu(nu, z.shape[1])


def roc(negative: torch.Tensor, positive: torch.Tensor) -> dict:
    """ROC of a detector score (higher = more suspicious): ``{"fpr", "tpr", "thresholds", "auc"}``.

    ``negative``: scores of benign inputs ``[n0]``; ``positive``: of adversarial inputs ``[n1]``.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    neg, pos = torch.as_tensor(negative).double().flatten(), torch.as_tensor(positive).double().flatten()
    if neg.numel() == 0 or pos.numel() == 0:
        raise ValueError(f"roc needs benign and adversarial scores; got {neg.numel()} and {pos.numel()}")
    labels = torch.cat([torch.zeros(len(neg)), torch.ones(len(pos))]).numpy()
    scores = torch.cat([neg, pos]).numpy()
    fpr, tpr, thr = roc_curve(labels, scores)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist(),
            "auc": float(roc_auc_score(labels, scores))}


@contextmanager
def _variant(dml, variant: str, **kw):
    saved = dict(variant=dml.variant, sigma=dml.sigma, samples=dml.samples, seed=dml.seed)
    dml.set_variant(variant, **kw)
    try:
        yield dml
    finally:
        dml.set_variant(saved.pop("variant"), **saved)


@torch.no_grad()
def uncertainty(net: nn.Module, x: torch.Tensor, *, draws: int = 20, sigma: float = 0.1,
                seed: int = 0) -> torch.Tensor:
    """Uncertainty features ``[B, 3]`` (:data:`FEATURES`) of ``x [B, C, H, W]`` (A.5.1).

    Softmax outputs ``p[t, m]`` of member m under R-DML draw t (``sigma``, one perturbed
    factor per draw, seeds ``seed + t * M + m``); per class, the variance across members of the
    draw-mean, the mean across members of the variance across draws, and the variance over all
    ``(t, m)``; each averaged over classes. A network without DMLs has no draws (draw_var = 0).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1; got {draws!r}")
    dmls = getattr(net, "dmls", None)
    if dmls is None:
        p = torch.softmax(net.member_logits(x), -1).unsqueeze(0)  # [1, B, M, K]
    else:
        emb = net.embeddings(x)  # backbones once; only the DMLs are redrawn
        m = len(dmls)
        per_draw = []
        for t in range(draws):
            z = []
            for i, dml in enumerate(dmls):
                with _variant(dml, "rdml", sigma=sigma, samples=1, seed=seed + t * m + i):
                    z.append(dml(emb[:, i]))
            per_draw.append(torch.stack(z, 1))
        p = torch.softmax(torch.stack(per_draw), -1)  # [T, B, M, K]
    member_var = p.mean(0).var(1, unbiased=False).mean(-1)
    draw_var = p.var(0, unbiased=False).mean(1).mean(-1)
    total_var = p.transpose(0, 1).flatten(1, 2).var(1, unbiased=False).mean(-1)
    return torch.stack([member_var, draw_var, total_var], -1)


class UncertaintyDetector:
    """Logistic regression on :func:`uncertainty` features (A.5.1): adversarial vs benign/noisy.

    Features enter as ``log(f + 1e-12)``, standardised. ``fit(negative, positive)`` with
    ``[n, 3]`` features; ``score(features) -> [n]`` probability of being adversarial.
    """

    def __init__(self, *, C: float = 1.0):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model = make_pipeline(StandardScaler(), LogisticRegression(C=C))

    @staticmethod
    def _x(features: torch.Tensor):
        f = torch.as_tensor(features).double()
        if f.dim() != 2:
            raise ValueError(f"features must be [n, F]; got {list(f.shape)}")
        return (f + 1e-12).log().numpy()

    def fit(self, negative: torch.Tensor, positive: torch.Tensor) -> UncertaintyDetector:
        import numpy as np

        x = np.concatenate([self._x(negative), self._x(positive)])
        y = np.concatenate([np.zeros(len(negative)), np.ones(len(positive))])
        self.model.fit(x, y)
        return self

    def score(self, features: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.model.predict_proba(self._x(features))[:, 1])

    def evaluate(self, negative: torch.Tensor, positive: torch.Tensor) -> dict:
        """ROC and AUC of the fitted detector on held-out features."""
        return roc(self.score(negative), self.score(positive))
