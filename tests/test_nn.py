"""pyens.nn: backbone shapes, Normalize, and the defining properties of MIMO and Ensemble."""
import numpy as np
import pytest
import torch
from torch import nn

import pyens.nn as pn

SHAPES = [(1, 28), (3, 32)]  # MNIST and CIFAR inputs (C, H = W)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list(pn.BACKBONES))
@pytest.mark.parametrize("c,h", SHAPES)
def test_backbone_output_shape(name, c, h):
    net = pn.build_backbone(name, in_channels=c, num_classes=7)
    assert net(rand(2, c, h, h)).shape == (2, 7)
    assert (net.in_channels, net.num_classes) == (c, 7)


def test_build_backbone_rejects_unknown_names_and_bad_sizes():
    with pytest.raises(ValueError, match="small_cnn, lenet, resnet18, resnet50"):
        pn.build_backbone("vgg", in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        pn.build_backbone("lenet", in_channels=1, num_classes=0)


def test_normalize_4d_and_5d():
    norm = pn.Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    x = rand(2, 4, 3, 5, 5)
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1), torch.tensor([0.5, 0.25, 2.0]).view(3, 1, 1)
    torch.testing.assert_close(norm(x), (x - mean) / std)
    torch.testing.assert_close(norm(x[:, 0]), (x[:, 0] - mean) / std)
    assert set(norm.state_dict()) == {"mean", "std"}
    with pytest.raises(ValueError, match=r"x must be .*C=3.*got shape \(2, 1, 5, 5\)"):
        norm(rand(2, 1, 5, 5))
    with pytest.raises(ValueError, match="one length"):
        pn.Normalize((0.1, 0.2), (1.0,))
    with pytest.raises(ValueError, match="positive"):
        pn.Normalize((0.1,), (0.0,))
    with pytest.raises(ValueError, match="mean must be finite"):
        pn.Normalize((float("nan"),), (1.0,))
    with pytest.raises(ValueError, match="std must be positive and finite"):
        pn.Normalize((0.1,), (float("inf"),))


def test_build_model_normalises_then_runs_the_backbone():
    model = pn.build_model("lenet", in_channels=1, num_classes=10, mean=(0.1307,), std=(0.3081,))
    x = rand(3, 1, 28, 28)
    torch.testing.assert_close(model(x), model.backbone((x - 0.1307) / 0.3081))
    assert (model.in_channels, model.num_classes) == (1, 10)


# --------------------------------------------------------------------------- MIMO
def first_and_last(net: nn.Module) -> tuple[nn.Module, nn.Module]:
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return convs[0], linears[-1]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list(pn.BACKBONES))
def test_mimo_grows_only_the_first_and_last_layers(name):
    m, c, k = 3, 3, 10
    single = pn.build_backbone(name, in_channels=c, num_classes=k)
    mimo = pn.MIMO(name, members=m, in_channels=c, num_classes=k)
    conv, fc = first_and_last(single)
    growth = (m - 1) * (conv.weight.numel() + n_params(fc))  # first conv's input channels, last layer's outputs
    assert n_params(mimo) == n_params(single) + growth
    assert n_params(mimo) < 1.05 * n_params(single)


@pytest.mark.parametrize("name", ["small_cnn", "lenet", "resnet18"])
@pytest.mark.parametrize("c,h", SHAPES)
def test_mimo_shapes(name, c, h):
    mimo = pn.MIMO(name, members=3, in_channels=c, num_classes=10, mean=(0.5,) * c, std=(0.25,) * c)
    assert mimo(rand(2, 3, c, h, h)).shape == (2, 3, 10)
    x = rand(2, c, h, h)
    assert mimo.ensemble(x).shape == (2, 10) and mimo.member(2)(x).shape == (2, 10)
    assert (mimo.members, mimo.num_classes) == (3, 10)


class Recorder(nn.Module):
    """A backbone that remembers its input and returns a fixed linear map of it."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.fc = nn.LazyLinear(num_classes)
        self.seen = None

    def forward(self, x):
        self.seen = x
        return self.fc(x.flatten(1))


def test_mimo_concatenates_normalised_slots_on_channels_and_splits_heads():
    mimo = pn.MIMO(Recorder, members=3, in_channels=2, num_classes=4, mean=(0.5, 0.0), std=(0.5, 2.0))
    x = rand(5, 3, 2, 6, 6)
    z = mimo(x)
    normalised = (x - torch.tensor([0.5, 0.0]).view(2, 1, 1)) / torch.tensor([0.5, 2.0]).view(2, 1, 1)
    torch.testing.assert_close(mimo.backbone.seen, normalised.reshape(5, 6, 6, 6))  # channel m*C + c
    torch.testing.assert_close(z, mimo.backbone.fc(mimo.backbone.seen.flatten(1)).view(5, 3, 4))


@pytest.fixture(scope="module")
def mimo():
    torch.manual_seed(1)
    return pn.MIMO("small_cnn", members=3, in_channels=1, num_classes=10, mean=(0.1307,), std=(0.3081,)).eval()


def test_member_is_its_head_with_the_input_in_every_slot(mimo):
    x = rand(4, 1, 28, 28)
    repeated = mimo(x.unsqueeze(1).repeat(1, 3, 1, 1, 1))
    for i in range(3):
        torch.testing.assert_close(mimo.member(i)(x), repeated[:, i])
    # Not the same function as feeding x to slot i alone: the other slots matter (shared trunk).
    lone = torch.zeros(4, 3, 1, 28, 28)
    lone[:, 0] = x
    assert not torch.allclose(mimo(lone)[:, 0], repeated[:, 0])


def test_ensemble_averages_the_members(mimo):
    x = rand(4, 1, 28, 28)
    members = torch.stack([mimo.member(i)(x) for i in range(3)], dim=1)
    prob = torch.softmax(members, dim=-1).mean(dim=1)
    torch.testing.assert_close(torch.softmax(mimo.ensemble(x), dim=-1), prob)
    torch.testing.assert_close(mimo.ensemble(x, average="prob"), prob.log())
    torch.testing.assert_close(mimo.ensemble(x, average="logits"), members.mean(dim=1))
    x.requires_grad_(True)
    nn.functional.cross_entropy(mimo.ensemble(x), torch.arange(4)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # attacks can target the ensemble


def test_member_shares_the_mimo_parameters():
    mimo = pn.MIMO("lenet", members=2, in_channels=1, num_classes=10)
    member = mimo.member(1)
    assert {id(p) for p in member.parameters()} == {id(p) for p in mimo.parameters()}
    x = rand(2, 1, 28, 28)
    before = member(x).detach()
    with torch.no_grad():
        first_and_last(mimo.backbone)[1].bias.add_(1.0)
    torch.testing.assert_close(member(x), before + 1.0)


def test_mimo_batch_gives_each_slot_a_permutation_of_the_batch():
    b, m = 9, 4
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 2, 3, 3)
    y = torch.arange(b) * 10
    xs, ys = pn.mimo_batch(x, y, m, generator=torch.Generator().manual_seed(0))
    assert xs.shape == (b, m, 2, 3, 3) and ys.shape == (b, m)
    ids = xs[:, :, 0, 0, 0].long()
    assert torch.equal(ys, ids * 10)  # labels travel with their images
    assert torch.equal(ids[:, 0], torch.arange(b))  # slot 0 keeps the batch order
    for slot in range(m):
        assert torch.equal(ids[:, slot].sort().values, torch.arange(b))
    assert len({tuple(ids[:, s].tolist()) for s in range(m)}) == m  # independent shuffles
    again, _ = pn.mimo_batch(x, y, m, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, xs)
    one_x, one_y = pn.mimo_batch(x, y, 1)
    assert torch.equal(one_x[:, 0], x) and torch.equal(one_y[:, 0], y)


def test_mimo_batch_input_repetition():
    b, m = 400, 3
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1)
    y = torch.arange(b)
    plain, _ = pn.mimo_batch(x, y, m, generator=torch.Generator().manual_seed(1))
    zero, _ = pn.mimo_batch(x, y, m, generator=torch.Generator().manual_seed(1), repetition=0.0)
    assert torch.equal(zero, plain)  # rho = 0 is the plain shuffles, same random stream
    same, ys = pn.mimo_batch(x, y, m, generator=torch.Generator().manual_seed(1), repetition=1.0)
    assert torch.equal(same, x[:, None].expand(b, m, 1, 1, 1)) and torch.equal(ys, y[:, None].expand(b, m))
    half, ys = pn.mimo_batch(x, y, m, generator=torch.Generator().manual_seed(1), repetition=0.5)
    ids = half[:, :, 0, 0, 0].long()
    assert torch.equal(ids, ys) and torch.equal(ids[:, 0], torch.arange(b))
    repeated = (ids == ids[:, :1]).all(dim=1)
    # a repeated row is all slot 0; any other row is the plain shuffle's row
    assert torch.equal(ids[~repeated], plain[:, :, 0, 0, 0].long()[~repeated])
    assert 150 < int(repeated.sum()) < 250  # Binomial(400, 0.5 + ~1/400^2): 5 sigma is +-50
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"repetition must be in \[0, 1\]"):
            pn.mimo_batch(x, y, m, repetition=bad)
    with pytest.raises(TypeError, match="repetition must be a number"):
        pn.mimo_batch(x, y, m, repetition="0.5")


# --------------------------------------------------------------------------- Ensemble
class Tag(nn.Module):
    """Returns its input's first K pixels plus a member tag: shows which model saw which slot."""

    num_classes = 3

    def __init__(self, tag):
        super().__init__()
        self.tag = tag

    def forward(self, x):
        return x.flatten(1)[:, :3] + self.tag


def test_ensemble_routes_slot_m_to_model_m():
    models = [Tag(10.0 * m) for m in range(3)]
    ens = pn.Ensemble(models)
    assert (ens.members, ens.num_classes) == (3, 3)
    x = rand(2, 3, 1, 4, 4)
    z = ens(x)
    for m in range(3):
        torch.testing.assert_close(z[:, m], x[:, m].flatten(1)[:, :3] + 10.0 * m)
        assert ens.member(m) is models[m]
    single = rand(2, 1, 4, 4)
    logits = torch.stack([model(single) for model in models], dim=1)
    torch.testing.assert_close(ens.ensemble(single, average="logits"), logits.mean(dim=1))
    torch.testing.assert_close(ens.ensemble(single), torch.softmax(logits, -1).mean(1).log())


def test_build_ensemble_makes_independent_models():
    ens = pn.build_ensemble("small_cnn", members=2, in_channels=3, num_classes=10, mean=(0.5,) * 3, std=(0.2,) * 3)
    assert ens(rand(2, 2, 3, 32, 32)).shape == (2, 2, 10) and ens.in_channels == 3
    w0, w1 = (first_and_last(ens.member(i))[0].weight for i in range(2))
    assert w0 is not w1 and not torch.equal(w0, w1)
    with pytest.raises(ValueError, match="num_classes"):
        pn.Ensemble([nn.Identity()])


# --------------------------------------------------------------------------- errors
def test_bad_shapes_name_the_argument(mimo):
    ens = pn.build_ensemble("lenet", members=3, in_channels=1, num_classes=10, mean=(0.0,), std=(1.0,))
    for model in (mimo, ens):
        for bad in (rand(2, 1, 28, 28), rand(2, 2, 1, 28, 28), rand(2, 3, 3, 28, 28)):
            with pytest.raises(ValueError, match=r"x must be \[B, M=3, C=1, H, W\].*got shape"):
                model(bad)
        with pytest.raises(ValueError, match=r"x must be \[B, C=1, H, W\]"):
            model.ensemble(rand(2, 3, 1, 28, 28))
        with pytest.raises(ValueError, match=r"i must be an int in \[0, 3\)"):
            model.member(3)
        with pytest.raises(ValueError, match="average must be one of prob, logits"):
            model.ensemble(rand(2, 1, 28, 28), average="vote")
    with pytest.raises(ValueError, match=r"x must be \[B, C, H, W\]"):
        pn.mimo_batch(rand(2, 28, 28), torch.zeros(2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"y must be \[B=2\]"):
        pn.mimo_batch(rand(2, 1, 28, 28), torch.zeros(3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="members must be a positive int"):
        pn.MIMO("lenet", members=0, in_channels=1, num_classes=10)
    # The value passed is named, not the M-fold channel / class count built from it.
    with pytest.raises(ValueError, match="in_channels must be a positive int; got -1"):
        pn.MIMO("lenet", members=3, in_channels=-1, num_classes=10)
    with pytest.raises(ValueError, match="num_classes must be a positive int; got '10'"):
        pn.MIMO("lenet", members=3, in_channels=1, num_classes="10")
    with pytest.raises(TypeError, match="y must be an integer tensor of class labels"):
        pn.mimo_batch(rand(2, 1, 28, 28), torch.zeros(2), 3)


def test_numpy_integers_are_accepted_where_ints_are():
    x, y = rand(4, 1, 28, 28), torch.arange(4)
    xm, ym = pn.mimo_batch(x, y, np.int64(2), generator=torch.Generator().manual_seed(0), repetition=np.float32(0.5))
    assert xm.shape == (4, 2, 1, 28, 28) and ym.shape == (4, 2)
    assert pn.MIMO("lenet", members=np.int64(2), in_channels=np.int64(1), num_classes=np.int32(10)).members == 2
