"""DMLEnsemble and dml_layout by value, on backbones that pass their input through.

Written to kill mutants of ``pyens/ensembles/dml.py`` (issue 17, section 5). The backbone is
``nn.Flatten`` on ``[B, 1, 1, N]`` images, so a member's embedding is its input and, with ``M = I``,
its logits are minus the Euclidean distances to its centers: every number is worked out by hand.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyens.ensembles import DMLEnsemble, dml_layout


def _flat(c, n):
    return nn.Flatten()


def _net(members=2, classes=3, **kw):
    kw = {"trainable": "all", "init": 1.0, "fixed": None, **kw}
    return DMLEnsemble(members, _flat, in_channels=1, num_classes=classes, **kw)


def _img(*v):
    return torch.tensor([v], dtype=torch.float32).view(1, 1, 1, -1)


@pytest.mark.parametrize("members, classes, embedding, per", [(3, 10, 12, 3), (2, 4, 4, 2), (2, 5, 7, 0),
                                                              (1, 3, 3, 3), (5, 10, 10, 2)])
def test_layout_partitions_labels_and_axes(members, classes, embedding, per):
    layout = dml_layout(members, classes, embedding, per, torch.Generator().manual_seed(1))
    assert len(layout) == members
    own_labels, own_axes = [], []
    for perm, axes in layout:
        assert perm.dtype == torch.long and perm.shape == (classes,)
        assert perm.unique().numel() == classes and 0 <= perm.min() and perm.max() < embedding
        assert len(axes) == per and axes == sorted(axes)
        labels = [c for c in range(classes) if perm[c].item() in axes]
        assert len(labels) == per  # exactly the own labels sit on the trainable axes
        own_labels += labels
        own_axes += axes
    assert len(set(own_labels)) == len(own_labels) == members * per  # disjoint L_k
    assert len(set(own_axes)) == len(own_axes) == members * per      # disjoint I_k
    torch.manual_seed(123)  # the layout follows the generator only
    again = dml_layout(members, classes, embedding, per, torch.Generator().manual_seed(1))
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(layout, again))


def test_layout_own_labels_are_consecutive_blocks_of_one_shuffle():
    g = torch.Generator().manual_seed(5)
    labels = torch.randperm(6, generator=g)  # what dml_layout draws first
    layout = dml_layout(3, 6, 6, 2, torch.Generator().manual_seed(5))
    for k, (perm, axes) in enumerate(layout):
        own = sorted(c for c in range(6) if perm[c].item() in axes)
        assert own == sorted(labels[2 * k:2 * k + 2].tolist())


def test_layout_rejects_too_many_entries():
    with pytest.raises(ValueError, match=r"trainable: 5 members x 3 entries exceed the 10 classes; "
                                         r"use at most 2 per member"):
        dml_layout(5, 10, 10, 3)
    with pytest.raises(ValueError, match="trainable: 2 members x -1 entries"):
        dml_layout(2, 10, 10, -1)


def test_member_logits_are_minus_distances_by_hand():
    net = _net(2, 3)
    x = _img(1.0, 2.0, 0.0)
    # ||x - e_a||^2 = ||x||^2 - 2 x_a + 1 = 6 - 2 x_a: a=0 -> 4, a=1 -> 2, a=2 -> 6
    by_axis = torch.tensor([2.0, math.sqrt(2.0), math.sqrt(6.0)])
    z = net.member_logits(x)
    for m, d in enumerate(net.dmls):
        torch.testing.assert_close(z[0, m], -by_axis[d.permutation])
    torch.testing.assert_close(net.ensemble(x), z.sum(1))  # the default rule: the summed logits
    torch.testing.assert_close(net.embeddings(x), x.view(1, 1, 3).expand(1, 2, 3))
    assert net.models[0].in_channels == 1 and net.models[0].num_classes == 3
    torch.testing.assert_close(net.models[1].features(x), x.view(1, 3))
    with pytest.raises(ValueError, match=r"x must be \[B, C=1, H, W\]"):
        net.embeddings(x.unsqueeze(1))


def test_normalisation_defaults_to_none_and_takes_mean_std():
    x = _img(1.0, 2.0, 0.0)
    torch.testing.assert_close(_net().embeddings(x)[0, 0], torch.tensor([1.0, 2.0, 0.0]))
    norm = _net(mean=(0.5,), std=(2.0,))
    torch.testing.assert_close(norm.embeddings(x)[0, 1], torch.tensor([0.25, 0.75, -0.25]))
    two = DMLEnsemble(1, lambda c, n: nn.Sequential(nn.Flatten(), nn.Linear(c * 2, n)), in_channels=2,
                      num_classes=3, seed=0)
    assert two.models[0].normalize(torch.ones(1, 2, 1, 1)).flatten().tolist() == [1.0, 1.0]


def test_constructor_defaults_and_plumbing():
    net = _net(2, 3)
    assert net.embedding == 3 and net.index_sets == ["all", "all"] and net.members == 2
    assert net.extra_repr() == "members=2, num_classes=3, embedding=3, index_sets=['all', 'all']"
    assert _net(2, 3, trainable="none").index_sets == ["none", "none"]
    assert not any(d.mask.any() for d in _net(2, 3, trainable="none").dmls)
    line = DMLEnsemble(2, _flat, num_classes=4, centers="1d", trainable="all")
    assert line.embedding == 1 and all(d.centers.shape == (4, 1) for d in line.dmls)
    wide = DMLEnsemble(2, _flat, num_classes=4, embedding=6, seed=3)
    assert wide.embedding == 6 and [len(s) for s in wide.index_sets] == [2, 2]  # K // M = 2
    for d, s in zip(wide.dmls, wide.index_sets):  # defaults: init U(0, 1) on I_k, the rest fixed at 0.1
        m = d.metric().diagonal()
        rest = [j for j in range(6) if j not in s]
        torch.testing.assert_close(m[rest], torch.full((4,), 0.1))
        assert (m[s] < 1).all() and d.form == "diag" and not isinstance(d.centers, nn.Parameter)
        assert d.mask.nonzero().flatten().tolist() == s and d.variant == "dml"
    assert [len(s) for s in DMLEnsemble(2, _flat, num_classes=4, trainable=1).index_sets] == [1, 1]
    again = DMLEnsemble(2, _flat, num_classes=4, embedding=6, seed=3)
    other = DMLEnsemble(2, _flat, num_classes=4, embedding=6, seed=4)
    assert all(torch.equal(a.permutation, b.permutation) and torch.equal(a.weight, b.weight)
               for a, b in zip(wide.dmls, again.dmls))
    assert any(not torch.equal(a.permutation, b.permutation) for a, b in zip(wide.dmls, other.dmls))


def test_constructor_defaults_are_the_papers():
    torch.manual_seed(0)
    net = DMLEnsemble()  # 5 LeNets on MNIST-shaped inputs, 10 classes, 2 trainable entries each
    assert (net.members, net.num_classes, net.embedding, net.in_channels) == (5, 10, 10, 1)
    assert type(net.models[0].backbone).__name__ == "LeNet"
    assert [len(s) for s in net.index_sets] == [2] * 5
    assert all((d.sigma, d.samples, d.variant) == (0.1, 20, "dml") for d in net.dmls)
    seeded = DMLEnsemble(5, _flat, num_classes=10, seed=0)  # the default seed is 0
    assert [d.permutation.tolist() for d in net.dmls] == [d.permutation.tolist() for d in seeded.dmls]


def test_constructor_passes_its_settings_to_every_layer():
    net = _net(2, 3, form="full", init=0.25, train_centers=True, randomized=True, sigma=0.3, samples=4)
    for d in net.dmls:
        assert d.form == "full" and isinstance(d.centers, nn.Parameter)
        assert d.randomized and (d.sigma, d.samples) == (0.3, 4)
        torch.testing.assert_close(d.metric(), torch.eye(3) * 0.25)
    aug = _net(2, 3, augment=True)
    assert all(d.augment and not d.randomized for d in aug.dmls)
    frozen = DMLEnsemble(3, _flat, num_classes=3, trainable=1, init=1.0, fixed=0.4)
    for d, s in zip(frozen.dmls, frozen.index_sets):
        want = torch.full((3,), 0.4)
        want[s] = 1.0
        torch.testing.assert_close(d.metric().diagonal(), want)


@pytest.mark.parametrize("kw, match", [
    (dict(members=0), "^members must be a positive int; got 0$"),
    (dict(num_classes=0), "^num_classes must be a positive int; got 0$"),
    (dict(in_channels=0), "^in_channels must be a positive int; got 0$"),
    (dict(centers="2d"), r"centers must be one of \('identity', '1d'\), got '2d'"),
    (dict(embedding=0), "^embedding must be a positive int; got 0$"),
    (dict(centers="1d", embedding=2, trainable="all"), "centers='1d' needs embedding 1; got 2"),
    (dict(seed=True), "seed must be an int >= 0; got True"),
    (dict(seed=-1), "seed must be an int >= 0; got -1"),
    (dict(seed=1.0), "seed must be an int >= 0; got 1.0"),
    (dict(trainable=True), r"trainable must be None, an int >= 0 per member, 'all' or 'none'; got True"),
    (dict(trainable=-1), r"trainable must be None, an int >= 0 per member, 'all' or 'none'; got -1"),
    (dict(trainable=1.0), r"trainable must be None, an int >= 0 per member, 'all' or 'none'; got 1.0"),
    (dict(centers="1d"), r"^trainable: with centers='1d' M is 1x1; use 'all' or 'none'$"),
    (dict(centers="1d", trainable=1), r"trainable: with centers='1d' M is 1x1"),
])
def test_constructor_rejects_bad_arguments(kw, match):
    args = {**dict(members=2, backbone=_flat, num_classes=4), **kw}
    with pytest.raises(ValueError, match=match):
        DMLEnsemble(**args)


def test_own_classes_are_the_labels_on_trainable_axes():
    net = DMLEnsemble(3, _flat, num_classes=6, trainable=2, seed=2)
    own = net.own_classes
    assert own.shape == (3, 6) and own.dtype == torch.bool
    for m, (d, s) in enumerate(zip(net.dmls, net.index_sets)):
        assert own[m].nonzero().flatten().tolist() == [c for c in range(6) if d.permutation[c].item() in s]


def test_set_variant_seeds_member_k_with_seed_plus_k():
    net = _net(3, 3)
    assert net.set_variant("rdml", sigma=0.2, samples=3, seed=10) is net
    assert [(d.variant, d.sigma, d.samples, d.seed) for d in net.dmls] == [("rdml", 0.2, 3, 10 + i) for i in range(3)]
    net.set_variant("aug")  # sigma, samples kept; seed back to fresh draws
    assert [(d.variant, d.sigma, d.samples, d.seed) for d in net.dmls] == [("aug", 0.2, 3, None)] * 3


def test_eq3_terms_by_hand_for_three_members():
    net = _net(3, 3)
    with torch.no_grad():  # P = sqrt(M): M_0 = diag(1, 1, 0), M_1 = diag(0, 4, 1), M_2 = diag(1, 0, 9)
        for d, p in zip(net.dmls, ([1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 3.0])):
            d.weight.copy_(torch.tensor(p))
    torch.testing.assert_close(net.metrics(), torch.stack([torch.diag(torch.tensor(v)) for v in
                                                           ([1.0, 1, 0], [0.0, 4, 1], [1.0, 0, 9])]))
    # ||M_0 M_1|| = ||(0, 4, 0)|| = 4, ||M_0 M_2|| = 1, ||M_1 M_2|| = 9; both orders: 2 (4 + 1 + 9)
    assert net.orthogonality().item() == pytest.approx(28.0)
    assert net.l1().item() == pytest.approx(2 + 5 + 10)
    assert net.penalty(0.5, 2.0).item() == pytest.approx(0.5 * 28 + 2 * 17)


def test_ensemble_rules_and_detection_by_hand():
    # 3 members, K = 3, M = I: a member votes for the class whose center is e_0 when x = e_0.
    net = _net(3, 3, seed=4)  # tops [[1, 2, 0], [2, 1, 2]]: agreement 1 and 2
    x = torch.cat([_img(1.0, 0.0, 0.0), _img(0.0, 0.0, 1.0)])
    tops = [[int((d.permutation == a).nonzero()) for d in net.dmls] for a in (0, 2)]
    z = net.member_logits(x)
    assert z.argmax(-1).tolist() == tops
    agree = [max(t.count(c) for c in t) for t in tops]
    for nu, need in (("majority", 2), ("unanimity", 3), (1, 1), (3, 3)):
        assert net.detect(x, nu=nu).tolist() == [a < need for a in agree]
    assert net.detect(x).tolist() == [a < 2 for a in agree]  # the default: majority
    vote = net.ensemble(x, average="vote")
    for b, t in enumerate(tops):
        counts = [t.count(c) for c in range(3)]
        assert vote[b].floor().tolist() == counts
    assert net.own_classes.all()  # trainable "all": every center lies on a trainable axis
    meta = net.ensemble(x, average="meta")
    assert (meta.floor() == 0).all()  # every member's top-1 is one of its own labels: all abstain
    with pytest.raises(ValueError, match="average must be one of"):
        net.ensemble(x, average="max")
