"""Consensus over ensemble members (DML paper Sec. 3.3, A.3): vote, meta-model, mean, median, sum.

Every rule maps member logits ``z [B, M, K]`` to ensemble scores ``[B, K]`` whose argmax is the
ensemble's decision:

=============  ===================================================================  ==============
rule           scores                                                               differentiable
=============  ===================================================================  ==============
``vote``       top-1 vote counts; ties go to the larger summed logit (the paper's)  no
``meta``       as ``vote``, but member m abstains when its top-1 is one of its own   no
               labels ``own[m]`` (the meta-model, Sec. 3.3)
``sum``        ``sum_m z_m`` (A.3: what white-box attacks target)                    yes
``mean``       ``mean_m z_m`` (alias ``logits``)                                     yes
``median``     ``median_m z_m`` (the lower median for even M)                        yes
``prob``       ``log mean_m softmax(z_m)`` (:func:`pyens.nn.average_members`)       yes
``soft_vote``  ``sum_m softmax(z_m / tau)``: a relaxation of ``vote``                yes
=============  ===================================================================  ==============

:class:`ConsensusClassifier` turns an ensemble into a classifier ``[B, C, H, W] -> [B, K]``
whose argmax is the consensus and whose *gradient* is a differentiable surrogate's (BPDA,
Athalye et al. 2018): an attack run on it is judged by the vote and steered by the summed
logits, never stalled by the vote's zero gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from pyens.checks import choice_arg
from pyens.nn.ensemble import average_members

RULES = ("vote", "meta", "sum", "mean", "logits", "median", "prob", "soft_vote")
HARD_RULES = ("vote", "meta")


def _check_logits(z: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 3:
        raise ValueError(f"z must be member logits [B, M, K]; got {getattr(z, 'shape', type(z).__name__)}")


def votes(z: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, K]`` counts of members whose top-1 is each class (``z: [B, M, K]``).

    ``own [M, K]`` bool: member m's vote is dropped when its top-1 is in ``own[m]`` (meta-model).
    """
    _check_logits(z)
    top = z.argmax(-1)  # [B, M]
    onehot = torch.nn.functional.one_hot(top, z.shape[-1]).to(z.dtype)  # [B, M, K]
    if own is not None:
        own = torch.as_tensor(own, dtype=torch.bool, device=z.device)
        if tuple(own.shape) != tuple(z.shape[1:]):
            raise ValueError(f"own must be [M, K] = {list(z.shape[1:])}; got {list(own.shape)}")
        onehot = onehot * (~own).to(z.dtype)
    return onehot.sum(1)


def _tie_break(z: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` in ``[0, 0.5)``: the rank of each class's summed logit, scaled below one vote."""
    k = z.shape[-1]
    ranks = z.detach().sum(1).argsort(-1).argsort(-1).to(z.dtype)
    return ranks / (2 * k)


def consensus(z: torch.Tensor, rule: str = "vote", *, own: torch.Tensor | None = None,
              tau: float = 1.0) -> torch.Tensor:
    """Ensemble scores ``[B, K]`` from member logits ``z [B, M, K]`` under ``rule`` (see the table).

    ``own``: ``[M, K]`` bool, each member's own labels (needed by ``"meta"``).
    ``tau``: temperature of ``"soft_vote"`` (``> 0``; smaller is closer to the hard vote).
    Hard rules return vote counts plus a tie-break below one vote, detached.
    """
    _check_logits(z)
    if rule in HARD_RULES:
        if rule == "meta" and own is None:
            raise ValueError("rule 'meta' needs own: each member's own labels [M, K]")
        return (votes(z, own if rule == "meta" else None) + _tie_break(z)).detach()
    if rule == "sum":
        return z.sum(1)
    if rule in ("mean", "logits"):
        return average_members(z, "logits")
    if rule == "median":
        return z.median(1).values
    if rule == "prob":
        return average_members(z, "prob")
    if rule == "soft_vote":
        if not tau > 0:
            raise ValueError(f"tau must be > 0; got {tau!r}")
        return torch.softmax(z / tau, -1).sum(1)
    raise ValueError(f"rule must be one of {RULES}; got {rule!r}")


def _member_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not hasattr(net, "member_logits"):
        raise TypeError(f"net must be a member ensemble with member_logits(x) -> [B, M, K]; got {type(net).__name__}")
    return net.member_logits(x)


class SurrogateScores(nn.Module):
    """``[B, C, H, W] -> [B, K]``: a differentiable consensus of ``net``'s members (default: sum)."""

    def __init__(self, net: nn.Module, rule: str = "sum", *, tau: float = 1.0):
        super().__init__()
        if rule in HARD_RULES or rule not in RULES:
            soft = tuple(r for r in RULES if r not in HARD_RULES)
            raise ValueError(f"surrogate must be a differentiable rule {soft}; got {rule!r}")
        self.net, self.rule, self.tau = net, rule, tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return consensus(_member_logits(self.net, x), self.rule, tau=self.tau)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}"


class ConsensusClassifier(nn.Module):
    """An ensemble as one classifier: argmax = the ``rule``'s decision, gradient = ``surrogate``'s.

    Args:
        net: a member ensemble (``member_logits(x [B, C, H, W]) -> [B, M, K]``), e.g. a
            :class:`pyens.ensembles.DMLEnsemble` or a :class:`pyens.nn.Ensemble`.
        rule: the decision (:data:`RULES`; the paper's: ``"vote"``).
        surrogate: the differentiable rule attacks follow (the paper's: ``"sum"``, A.3).
        tau: temperature when either is ``"soft_vote"``.

    ``forward(x) = v.detach() + (s - s.detach())``: in value exactly ``v`` (the rule's scores),
    in gradient ``s`` (the surrogate's). ``.surrogate`` is the surrogate alone, for attacks that
    should follow the paper's protocol exactly (loss on the summed logits).
    """

    def __init__(self, net: nn.Module, rule: str = "vote", *, surrogate: str = "sum", tau: float = 1.0):
        super().__init__()
        choice_arg(rule, "rule", RULES)
        if rule == "meta" and getattr(net, "own_classes", None) is None:
            raise ValueError("rule 'meta' needs a net with own_classes (a DMLEnsemble)")
        self.net, self.rule, self.tau = net, rule, tau
        self.surrogate = SurrogateScores(net, surrogate, tau=tau)

    @property
    def members(self) -> int:
        return self.net.members

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = _member_logits(self.net, x)
        s = consensus(z, self.surrogate.rule, tau=self.tau)
        if self.rule == self.surrogate.rule:
            return s
        own = self.net.own_classes if self.rule == "meta" else None
        v = consensus(z, self.rule, own=own, tau=self.tau)
        return v.detach() + (s - s.detach())  # exactly v in value (s - s is 0), s's gradient

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, surrogate={self.surrogate.rule!r}"
