"""pyens.nn.DistanceMap: shapes, gradients, frozen entries, centers, R-DML / AUG-DML, errors."""
from __future__ import annotations

import pytest
import torch

from pyens.nn import DistanceMap
from tests.conftest import assert_close


def _hand_distances(x, factor, centers, form):
    f = torch.diag(factor) if form == "diag" else (factor.tril() if form == "tril" else factor)
    diff = x[:, None, :] - centers[None]  # [B, C, N]
    return ((diff @ f.T) ** 2).sum(-1).add(1e-12).sqrt()


@pytest.mark.parametrize("form", ["diag", "tril", "full"])
def test_logits_are_negative_distances_and_differentiable(form):
    torch.manual_seed(0)
    layer = DistanceMap(6, 4, form=form, generator=torch.Generator().manual_seed(1)).double()
    if form != "diag":
        with torch.no_grad():
            layer.weight.add_(0.1 * torch.randn_like(layer.weight))
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    z = layer(x)
    assert z.shape == (5, 4) and z.dtype == torch.float64
    assert_close(z, -_hand_distances(x, layer.factor(), layer.centers, form), rtol=1e-9, atol=1e-9, what=form)
    w = layer.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, p: torch.func.functional_call(layer, {"weight": p}, (a,)), (x, w),
                                    eps=1e-6, atol=1e-6)


def test_metric_and_l1_by_hand():
    layer = DistanceMap(3, 3, trainable=[0, 2], init=0.5, fixed=0.1, permutation=[0, 1, 2])
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([2.0, 9.0, -3.0]))
    # M = diag(P^2); P_1 is frozen at sqrt(0.1) whatever weight holds there.
    assert_close(layer.metric(), torch.diag(torch.tensor([4.0, 0.1, 9.0])), rtol=1e-6, atol=1e-6, what="M")
    assert layer.l1().item() == pytest.approx(13.0)
    tril = DistanceMap(2, 2, form="tril", init=1.0, permutation=[0, 1])
    with torch.no_grad():
        tril.weight.copy_(torch.tensor([[1.0, 5.0], [2.0, 3.0]]))  # upper entry ignored
    lower = torch.tensor([[1.0, 0.0], [2.0, 3.0]])
    assert_close(tril.metric(), lower.T @ lower, rtol=1e-6, atol=1e-6, what="tril M")
    assert tril.l1().item() == pytest.approx((lower.T @ lower).tril().abs().sum().item())


@pytest.mark.parametrize("form", ["diag", "tril"])
def test_frozen_entries_never_move(form):
    layer = DistanceMap(5, 5, form=form, trainable=[1, 3], init="uniform", fixed=0.1,
                        generator=torch.Generator().manual_seed(0))
    before = layer.factor().detach().clone()
    frozen = ~layer.mask
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.5)  # decay would move any weight
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(8, 5)).logsumexp(1).sum().backward()
        assert bool((layer.weight.grad[frozen] == 0).all())
        opt.step()
    after = layer.factor().detach()
    assert torch.equal(after[frozen], before[frozen])
    assert not torch.equal(after[layer.mask], before[layer.mask])
    diag = after if form == "diag" else after.diagonal()
    m = diag ** 2
    assert torch.allclose(m[[0, 2, 4]], torch.full((3,), 0.1))  # the paper's fixed M_jj = 0.1


def test_no_trainable_entry_means_no_trainable_weight():
    layer = DistanceMap(4, 4, trainable="none", init=0.1)
    assert not layer.weight.requires_grad and layer.mask.sum() == 0


def test_init_uniform_and_constant():
    layer = DistanceMap(200, 10, init="uniform", generator=torch.Generator().manual_seed(0))
    m = layer.metric().diagonal()
    assert 0 < m.min() and m.max() < 1 and 0.4 < m.mean() < 0.6
    assert torch.allclose(DistanceMap(4, 4, init=0.3).metric().diagonal(), torch.full((4,), 0.3))


def test_centers_identity_shuffled_1d_and_own_classes():
    g = torch.Generator().manual_seed(0)
    a = DistanceMap(10, 10, generator=g)
    b = DistanceMap(10, 10, generator=g)
    assert torch.equal(a.centers, torch.eye(10)[a.permutation]) and not torch.equal(a.permutation, b.permutation)
    assert a.centers.sum(1).eq(1).all() and a.permutation.unique().numel() == 10
    wide = DistanceMap(12, 10, permutation=list(range(2, 12)))
    assert torch.equal(wide.centers, torch.eye(12)[2:])
    line = DistanceMap(1, 5, centers="1d", permutation=[4, 0, 3, 1, 2])
    assert line.centers.flatten().tolist() == [4.0, 0.0, 3.0, 1.0, 2.0]
    assert not line.own_classes().any()
    own = DistanceMap(4, 4, trainable=[2], permutation=[3, 2, 0, 1]).own_classes()
    assert own.tolist() == [False, True, False, False]  # class 1's center is e_2, a trainable axis
    trained = DistanceMap(3, 2, centers=torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]), train_centers=True)
    assert isinstance(trained.centers, torch.nn.Parameter)


def test_rdml_is_reproducible_with_a_seed():
    torch.manual_seed(0)
    layer = DistanceMap(6, 6, generator=torch.Generator().manual_seed(0))
    x = torch.randn(7, 6)
    plain = layer(x)
    layer.set_variant("rdml", sigma=0.3, samples=8, seed=11)
    a, b = layer(x), layer(x)
    assert torch.equal(a, b) and not torch.allclose(a, plain)
    layer.set_variant("rdml", seed=12)
    assert not torch.equal(layer(x), a)
    layer.set_variant("rdml", seed=None)  # fresh draws each call, governed by torch.manual_seed
    torch.manual_seed(3)
    c = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), c) and not torch.equal(layer(x), c)
    layer.set_variant("rdml", sigma=0.0, samples=3, seed=1)
    assert_close(layer(x), plain, rtol=1e-5, atol=1e-5, what="sigma 0")
    r = DistanceMap(6, 6, randomized=True, sigma=0.2, samples=4, seed=5)
    x.requires_grad_(True)
    r(x).sum().backward()
    assert torch.isfinite(x.grad).all() and r.weight.grad.abs().sum() > 0


def test_aug_dml_averages_noisy_inputs():
    layer = DistanceMap(4, 3, augment=True, sigma=0.5, samples=6, seed=2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 4)
    assert torch.equal(layer(x), layer(x)) and layer.augment and not layer.randomized
    g = torch.Generator().manual_seed(2)
    noise = torch.randn((6, 5, 4), generator=g)
    want = torch.stack([_hand_distances(x + 0.5 * noise[t], layer.factor(), layer.centers, "diag")
                        for t in range(6)]).mean(0)
    assert_close(-layer(x), want, rtol=1e-5, atol=1e-5, what="AUG-DML")
    layer.set_variant("aug", sigma=0.0)
    assert_close(layer(x), layer.set_variant("dml")(x), rtol=1e-6, atol=1e-6, what="sigma 0")


@pytest.mark.parametrize("kwargs, match", [
    (dict(form="cholesky"), "form must be one of"),
    (dict(trainable=[0, 9]), r"trainable: diagonal indices must be distinct ints in \[0, 4\)"),
    (dict(trainable=[1, 1]), "trainable: diagonal indices must be distinct"),
    (dict(trainable=torch.ones(3, dtype=torch.bool)), "trainable: a mask must be a bool tensor of P's shape"),
    (dict(trainable="some"), "trainable must be 'all', 'none'"),
    (dict(init="normal"), "init must be 'uniform' or a number"),
    (dict(init=-1.0), "init must be a finite number > 0"),
    (dict(fixed=0.0), "fixed must be a finite number > 0"),
    (dict(centers="sphere"), "centers must be one of"),
    (dict(centers=torch.zeros(3, 4)), r"centers: a tensor must be floating \[C, N\]"),
    (dict(permutation=[0, 0, 1, 2]), "permutation must hold 4 distinct ints"),
    (dict(permutation=[0, 1, 2, 4]), "permutation must hold 4 distinct ints in"),
    (dict(permutation=[0.2, 1.7, 2.9, 3.0]), "permutation must hold ints; got torch.float32"),
    (dict(randomized=True, augment=True), "randomized and augment are exclusive"),
    (dict(sigma=-0.1), "sigma must be a finite number >= 0"),
    (dict(samples=0), "samples must be a positive int"),
    (dict(seed=-1), "seed must be None or an int"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistanceMap(4, 4, **kwargs)


def test_bad_shapes_and_sizes():
    with pytest.raises(ValueError, match="centers='identity' needs in_features >= num_classes"):
        DistanceMap(3, 4)
    with pytest.raises(ValueError, match="centers='1d' needs in_features == 1"):
        DistanceMap(2, 4, centers="1d")
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        DistanceMap(0, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, in_features=4\]"):
        DistanceMap(4, 4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="variant must be"):
        DistanceMap(4, 4).set_variant("noisy")
