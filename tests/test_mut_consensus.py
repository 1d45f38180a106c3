"""Consensus rules and ConsensusClassifier by value, on logits whose answers are worked out by hand.

Written to kill mutants of ``pyens/ensembles/consensus.py`` (issue 17, section 5): every expected
number below is computed by hand in the comment beside it, never with the rule's own expression.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyens.ensembles import ConsensusClassifier, consensus, votes
from pyens.ensembles.consensus import HARD_RULES, RULES, SurrogateScores

LN3 = math.log(3.0)


class FixedMembers(nn.Module):
    """A member ensemble whose logits are its input: ``x [B, M*K] -> z [B, M, K]``."""

    def __init__(self, members: int, classes: int, own: torch.Tensor | None = None):
        super().__init__()
        self.members, self.num_classes = members, classes
        if own is not None:
            self.own_classes = own

    def member_logits(self, x):
        return x.view(x.shape[0], self.members, self.num_classes)


def test_sum_mean_median_by_hand():
    # one example, M = 3, K = 2: members' logits [1, 6], [4, 0], [7, 3]
    z = torch.tensor([[[1.0, 6.0], [4.0, 0.0], [7.0, 3.0]]])
    assert consensus(z, "sum").tolist() == [[12.0, 9.0]]       # 1+4+7, 6+0+3
    assert consensus(z, "mean").tolist() == [[4.0, 3.0]]       # 12/3, 9/3
    assert consensus(z, "logits").tolist() == [[4.0, 3.0]]     # alias of mean
    assert consensus(z, "median").tolist() == [[4.0, 3.0]]     # middle of (1, 4, 7) and of (6, 0, 3)
    # M = 4: the lower median of (4, 1, 3, 2) is 2 (not 2.5, not 3)
    z4 = torch.tensor([[[4.0], [1.0], [3.0], [2.0]]])
    assert consensus(z4, "median").tolist() == [[2.0]]


def test_prob_and_soft_vote_by_hand():
    # member 0: logits [0, 0] -> softmax [1/2, 1/2]; member 1: [ln 3, 0] -> [3/4, 1/4]
    z = torch.tensor([[[0.0, 0.0], [LN3, 0.0]]], dtype=torch.float64)
    # prob: log of the mean probability, log([5/8, 3/8])
    torch.testing.assert_close(consensus(z, "prob"), torch.tensor([[math.log(5 / 8), math.log(3 / 8)]],
                                                                    dtype=torch.float64))
    # soft_vote, tau = 1 (the default): [1/2 + 3/4, 1/2 + 1/4]
    torch.testing.assert_close(consensus(z, "soft_vote"), torch.tensor([[1.25, 0.75]], dtype=torch.float64))
    # tau = 1/2 doubles the logits: member 1 -> [2 ln 3, 0] -> [9/10, 1/10]
    torch.testing.assert_close(consensus(z, "soft_vote", tau=0.5), torch.tensor([[1.4, 0.6]], dtype=torch.float64))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tau must be > 0"):
            consensus(z, "soft_vote", tau=bad)


def test_vote_tie_break_values_and_dtype():
    # three members, each voting for a different class: a three-way tie of one vote each.
    # Summed logits [2, 1, 0.5] rank the classes 2, 1, 0; tie-break = rank / (2 K) = rank / 6.
    z = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]]], dtype=torch.float64,
                     requires_grad=True)
    want = torch.tensor([[1 + 2 / 6, 1 + 1 / 6, 1.0]], dtype=torch.float64)
    got = consensus(z, "vote")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got.dtype == torch.float64 and not got.requires_grad  # hard rules are detached
    # a clear majority: votes [0, 2, 1] for classes 0..2; summed logits [0.5, 2, 1] -> ranks [0, 2, 1]
    z2 = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]]])
    torch.testing.assert_close(consensus(z2, "vote"), torch.tensor([[0.0, 2 + 2 / 6, 1 + 1 / 6]]))
    # M = 2 members, K = 3 classes (the scale is 1 / (2 K), not 1 / (2 M)); two examples whose
    # summed logits rank the classes differently: [0.2, 0.9, 0.5] -> ranks [0, 2, 1];
    # [0.7, 0.1, 0.81] -> ranks [1, 0, 2]; votes: [0, 1, 1] and [0, 0, 2]
    z3 = torch.tensor([[[0.1, 0.0, 0.4], [0.1, 0.9, 0.1]],
                       [[0.3, 0.1, 0.4], [0.4, 0.0, 0.41]]])  # example 1 sums to [0.7, 0.1, 0.81]
    torch.testing.assert_close(consensus(z3, "vote"), torch.tensor([[0.0, 1 + 2 / 6, 1 + 1 / 6],
                                                                    [1 / 6, 0.0, 2 + 2 / 6]]))
    torch.testing.assert_close(consensus(z3), consensus(z3, "vote"))  # the default rule
    # the "vote" rule ignores own (only "meta" reads it)
    own = torch.tensor([[False, True, False]] * 3)
    torch.testing.assert_close(consensus(z2, "vote", own=own), consensus(z2, "vote"))


def test_meta_drops_own_votes_by_value():
    z = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]]])
    own = [[0, 1, 0], [0, 0, 0], [0, 0, 1]]  # any array-like, read as bool
    # member 0 abstains (its top-1, class 1, is its own), member 2 abstains (class 2): votes [0, 1, 0]
    assert votes(z, own).tolist() == [[0.0, 1.0, 0.0]]
    torch.testing.assert_close(consensus(z, "meta", own=own), torch.tensor([[0.0, 1 + 2 / 6, 1 / 6]]))
    assert votes(z).tolist() == [[0.0, 2.0, 1.0]]
    with pytest.raises(ValueError, match=r"own must be \[M, K\] = \[3, 3\]; got \[3, 2\]"):
        votes(z, torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"z must be member logits \[B, M, K\]; got torch.Size\(\[3, 3\]\)"):
        votes(z[0])
    with pytest.raises(ValueError, match=r"z must be member logits \[B, M, K\]; got list"):
        consensus([[1.0]], "sum")


def test_surrogate_scores_checks_and_values():
    net = FixedMembers(2, 2)
    x = torch.tensor([[0.0, 0.0, LN3, 0.0]], dtype=torch.float64)
    for rule in (*HARD_RULES, "max"):
        with pytest.raises(ValueError, match=r"surrogate must be a differentiable rule \('sum', 'mean', 'logits', "
                                             r"'median', 'prob', 'soft_vote'\); got '" + rule):
            SurrogateScores(net, rule)
    assert set(RULES) - set(HARD_RULES) == {"sum", "mean", "logits", "median", "prob", "soft_vote"}
    s = SurrogateScores(net)  # the default: sum
    assert s.rule == "sum" and s.extra_repr() == "rule='sum'"
    torch.testing.assert_close(s(x), torch.tensor([[LN3, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(SurrogateScores(net, "soft_vote")(x), torch.tensor([[1.25, 0.75]], dtype=torch.float64))
    soft = SurrogateScores(net, "soft_vote", tau=0.5)
    torch.testing.assert_close(soft(x), torch.tensor([[1.4, 0.6]], dtype=torch.float64))
    with pytest.raises(TypeError, match=r"net must be a member ensemble with member_logits\(x\) -> \[B, M, K\]; "
                                        r"got Identity"):
        SurrogateScores(nn.Identity())(x)


def test_consensus_classifier_value_rule_gradient_surrogate():
    own = torch.tensor([[False, True, False], [False, False, False], [False, False, True]])
    net = FixedMembers(3, 3, own=own)
    z = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]]])
    x = z.flatten(1).clone().requires_grad_(True)

    clf = ConsensusClassifier(net)  # rule vote, surrogate sum
    assert clf.rule == "vote" and clf.surrogate.rule == "sum" and clf.tau == 1.0
    assert clf.members == 3 and clf.num_classes == 3
    assert clf.extra_repr() == "rule='vote', surrogate='sum'"
    out = clf(x)
    torch.testing.assert_close(out, torch.tensor([[0.0, 2 + 2 / 6, 1 + 1 / 6]]))
    (g,) = torch.autograd.grad(out[:, 2].sum(), x)
    assert g.tolist() == [[0.0, 0.0, 1.0] * 3]  # d(sum_m z_m2)/dz = 1 at every member's class 2

    meta = ConsensusClassifier(net, "meta", surrogate="mean")
    torch.testing.assert_close(meta(x), torch.tensor([[0.0, 1 + 2 / 6, 1 / 6]]))
    (g,) = torch.autograd.grad(meta(x)[:, 1].sum(), x)
    torch.testing.assert_close(g, torch.tensor([[0.0, 1 / 3, 0.0] * 3]))  # the mean's gradient



def test_consensus_classifier_passes_tau_to_rule_and_surrogate():
    # member 0: [0, 0], member 1: [ln 3, 0]; with tau = 1/2 soft_vote is [1.4, 0.6] (see above)
    net = FixedMembers(2, 2)
    x = torch.tensor([[0.0, 0.0, LN3, 0.0]], dtype=torch.float64, requires_grad=True)
    want = torch.tensor([[1.4, 0.6]], dtype=torch.float64)
    same = ConsensusClassifier(net, "soft_vote", surrogate="soft_vote", tau=0.5)
    torch.testing.assert_close(same(x), want)
    torch.testing.assert_close(ConsensusClassifier(net, "soft_vote", tau=0.5)(x), want)
    clf = ConsensusClassifier(net, "sum", surrogate="soft_vote", tau=0.5)
    torch.testing.assert_close(clf.surrogate(x), want)
    torch.testing.assert_close(clf(x), torch.tensor([[LN3, 0.0]], dtype=torch.float64))  # value: the sum
    # gradient: d softmax(z/tau)_0 / dz = p0 (1 - p0) / tau at class 0, -p0 p1 / tau at class 1;
    # member 0 (p = [1/2, 1/2]): +-0.5; member 1 (p = [9/10, 1/10]): +-0.18
    (g,) = torch.autograd.grad(clf(x)[:, 0].sum(), x)
    torch.testing.assert_close(g, torch.tensor([[0.5, -0.5, 0.18, -0.18]], dtype=torch.float64))


def test_consensus_classifier_rejects_bad_rules():
    net = FixedMembers(2, 2)
    with pytest.raises(ValueError, match=r"rule must be one of \('vote', 'meta', .*\), got 'max'"):
        ConsensusClassifier(net, "max")
    with pytest.raises(ValueError, match=r"^rule 'meta' needs a net with own_classes \(a DMLEnsemble\)$"):
        ConsensusClassifier(net, "meta")
    with pytest.raises(ValueError, match="surrogate must be a differentiable rule"):
        ConsensusClassifier(net, "sum", surrogate="meta")
    with pytest.raises(ValueError, match=r"^rule 'meta' needs own: each member's own labels \[M, K\]$"):
        consensus(torch.zeros(1, 2, 2), "meta")
    with pytest.raises(ValueError, match="rule must be one of"):
        consensus(torch.zeros(1, 2, 2), "max")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_meta_own_given_on_the_cpu_follows_z_to_its_device():
    z = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]]], device="cuda")
    own = [[0, 1, 0], [0, 0, 0], [0, 0, 1]]
    assert votes(z, own).tolist() == [[0.0, 1.0, 0.0]]
    assert votes(z, torch.tensor(own, dtype=torch.bool)).tolist() == [[0.0, 1.0, 0.0]]
