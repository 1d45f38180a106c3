"""pyens.attacks on constructed models whose answers are known (mutation testing, issue 17).

Each test pins a value the attack suite left free: exact error messages (the argument named,
the received value shown), the documented tie and restart rules, per-member random starts,
defaults (l1 sparsity 20), the box and projection reaching every step, and the l1 sparsity
draw of ``k_range``. Models are linear in the input, so the gradient direction is known in
closed form: for logits ``[0, w . x]`` and label 0 the CE gradient is ``sigmoid(w . x) * w``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pyens.attacks import (BIM, FGSM, MSD, PGD, cross_gradient_ratio, margin_loss, mimo_gradient, mimo_msd, mimo_pgd,
                           random_start)
from pyens.attacks.msd import msd_iterate

N = 16


class Wrong(nn.Module):
    """``[B, ...] -> [B, 2]``: class 0 scores 0, class 1 scores ``w . x`` (label 0 throughout)."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):
        wrong = x.flatten(1) @ self.w
        return torch.stack([torch.zeros_like(wrong), wrong], -1)


class SlotWrong(nn.Module):
    """MIMO ``[B, M, N] -> [B, M, 2]``: member m's wrong-class logit is ``w[m] . x[:, m]``."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):
        wrong = (x.flatten(2) * self.w).sum(-1)
        return torch.stack([torch.zeros_like(wrong), wrong], -1)


def ramp(n, dtype=torch.float64):
    """Weights with distinct magnitudes and alternating signs (an unambiguous top-k)."""
    return torch.arange(1, n + 1, dtype=dtype) * torch.tensor([1.0, -1.0], dtype=dtype).repeat(n // 2)


def raises(exc, message, call):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value) == message


# ---------------------------------------------------------------------------------------------
# exact error messages

def _linear3():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()


def _mimo23():
    """M = 2 members, K = 3 classes (M != K, so a wrong class-count axis shows)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    return lambda x: lin(x.flatten(2))


def message_cases():
    net, mimo = _linear3(), _mimo23()
    x = torch.full((2, 1, 2, 2), 0.5, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    mx = torch.full((2, 2, 4), 0.5, dtype=torch.float64)
    my = torch.zeros(2, 2, dtype=torch.long)
    pgd = dict(norm="linf", eps=0.1, alpha=0.05, steps=1)
    msd = dict(eps=[0.1, 0.5, 2.0], alpha=[0.05, 0.1, 0.5], steps=1)
    mp = dict(norms=("linf", "l2"), eps=[0.1, 0.5], alpha=[0.05, 0.1], steps=1)
    ms = dict(norms=("linf", "l2"), eps=[0.1, 0.5], alpha=[0.05, 0.1], steps=1)
    V, T = ValueError, TypeError
    one_of_norms = "must be 'linf', 'l2' or 'l1' (or inf, 2, 1), got"
    yield V, f"norm {one_of_norms} 'l3'", lambda: PGD(net, **{**pgd, "norm": "l3"})
    yield V, f"norms[1] {one_of_norms} 'lp'", lambda: MSD(net, **{**msd, "norms": ("linf", "lp", "l1")})
    yield V, "eps must be >= 0, got -0.1", lambda: PGD(net, **{**pgd, "eps": -0.1})
    yield V, "alpha must be >= 0, got -1.0", lambda: PGD(net, **{**pgd, "alpha": -1.0})
    yield V, "eps must be finite, got inf", lambda: PGD(net, **{**pgd, "eps": 10 ** 400})
    yield V, "eps must be finite, got -inf", lambda: PGD(net, **{**pgd, "eps": -10 ** 400})
    yield V, "alpha must be finite, got nan", lambda: PGD(net, **{**pgd, "alpha": math.nan})
    yield T, "eps must be a real number, got str", lambda: PGD(net, **{**pgd, "eps": "0.1"})
    yield T, "alpha must be a real number, got bool", lambda: PGD(net, **{**pgd, "alpha": True})
    yield V, "k must be a positive int; got 0", lambda: PGD(net, **pgd, k=0)
    yield V, "steps must be a positive int; got 2.5", lambda: PGD(net, **{**pgd, "steps": 2.5})
    yield V, "steps must be a positive int; got True", lambda: PGD(net, **{**pgd, "steps": True})
    yield V, "restarts must be a positive int; got 0", lambda: PGD(net, **pgd, restarts=0)
    yield V, "restarts=2 needs random_start=True: from delta = 0 every restart is the same run", \
        lambda: PGD(net, **pgd, restarts=2)
    yield V, "projection must be one of ('exact', 'sequential'), got 'nearest'", \
        lambda: PGD(net, **pgd, projection="nearest")
    yield V, "box must be finite with lo <= hi, got (1, 0)", lambda: PGD(net, **pgd, box=(1, 0))
    yield V, "box must be a pair (lo, hi) of numbers, got 'ab'", lambda: PGD(net, **pgd, box="ab")
    yield V, "box must be a pair (lo, hi) of numbers, got ('0', '1')", lambda: PGD(net, **pgd, box=("0", "1"))
    yield V, "box must be a pair (lo, hi) of numbers, got (0, 0.5, 1)", lambda: PGD(net, **pgd, box=(0, 0.5, 1))
    yield T, "random_start must be True or False, got 'no'", lambda: PGD(net, **pgd, random_start="no")
    yield T, "random_start must be True or False, got np.int64(1)", \
        lambda: PGD(net, **pgd, random_start=np.int64(1))
    yield V, "loss must be one of ['ce', 'margin'] or a callable, got 'hinge'", lambda: PGD(net, **pgd, loss="hinge")
    # MSD
    nonempty = "norms must be a non-empty sequence of 'linf'/'l2'/'l1', got"
    yield V, f"{nonempty} ()", lambda: MSD(net, **{**msd, "norms": ()})
    yield V, f"{nonempty} 'linf'", lambda: MSD(net, **{**msd, "norms": "linf"})
    yield V, f"{nonempty} {{'linf': 1}}", lambda: MSD(net, **{**msd, "norms": {"linf": 1}})
    yield V, "eps must have one entry per norm (3), got 2", lambda: MSD(net, **{**msd, "eps": [0.1, 0.5]})
    yield V, "alpha must have one entry per norm (3), got 1", lambda: MSD(net, **{**msd, "alpha": [0.1]})
    yield V, "k must have one entry per norm (3), got 2", lambda: MSD(net, **msd, k=[1, 2])
    yield V, "alpha[1] must be >= 0, got -1.0", lambda: MSD(net, **{**msd, "alpha": (0.1, -1, 0.1)})
    yield V, "k[1] must be a positive int; got 0", lambda: MSD(net, **msd, k=(1, 0, 1))
    yield V, "k must be a positive int; got 0", lambda: MSD(net, **msd, k=0)
    yield V, "steps must be a positive int; got 0", lambda: MSD(net, **{**msd, "steps": 0})
    yield V, "select must be one of ('example', 'batch'), got 'batches'", lambda: MSD(net, **msd, select="batches")
    yield V, "score must be one of ('auto', 'stacked', 'per_norm'), got 'fast'", lambda: MSD(net, **msd, score="fast")
    yield V, "k_range must have lo <= hi, got (9, 5)", lambda: MSD(net, **msd, k_range=(9, 5))
    yield V, "k_range must hold ints >= 1, got (2.5, 5)", lambda: MSD(net, **msd, k_range=(2.5, 5))
    yield V, "k_range must hold ints >= 1, got (True, 3)", lambda: MSD(net, **msd, k_range=(True, 3))
    yield V, "k_range must be empty or a pair (lo, hi), got (5,)", lambda: MSD(net, **msd, k_range=(5,))
    # MIMO PGD / gradient
    yield V, "norms must have one entry per member (2), got 3", \
        lambda: mimo_pgd(mimo, mx, my, **{**mp, "norms": ("linf", "l2", "l1")})
    yield V, "eps must have one entry per member (2), got 3", lambda: mimo_pgd(mimo, mx, my, **{**mp, "eps": [.1] * 3})
    yield V, "alpha must have one entry per member (2), got 1", lambda: mimo_pgd(mimo, mx, my, **{**mp, "alpha": [.1]})
    yield V, "k must have one entry per member (2), got 3", lambda: mimo_pgd(mimo, mx, my, **mp, k=[1, 2, 3])
    yield V, "eps must be >= 0, got -0.1", lambda: mimo_pgd(mimo, mx, my, **{**mp, "eps": -0.1})
    yield V, "gradient must be one of ('approx', 'naive'), got 'exact'", \
        lambda: mimo_pgd(mimo, mx, my, **mp, gradient="exact")
    yield V, "gradient must be one of ('approx', 'naive'), got 'exact'", \
        lambda: mimo_gradient(mimo, mx, my, gradient="exact")
    yield V, "delta must have x's shape (2, 2, 4), got torch.Size([2, 1, 4])", \
        lambda: mimo_gradient(mimo, mx, my, delta=mx[:, :1])
    yield V, "delta must have x's shape (2, 2, 4), got [1.0]", lambda: mimo_gradient(mimo, mx, my, delta=[1.0])
    yield V, "delta must be finite, got NaN or infinity", \
        lambda: mimo_gradient(mimo, mx, my, delta=torch.full_like(mx, math.inf))
    # MIMO MSD
    yield V, "select must be one of ('example', 'batch'), got 'mean'", \
        lambda: mimo_msd(mimo, mx, my, **ms, select="mean")
    yield V, "score must be one of ('auto', 'stacked', 'per_norm'), got 'x'", \
        lambda: mimo_msd(mimo, mx, my, **ms, score="x")
    yield T, "random_start must be True or False, got 'yes'", \
        lambda: mimo_msd(mimo, mx, my, **ms, random_start="yes")
    yield V, "start_norms needs random_start=True", lambda: mimo_msd(mimo, mx, my, **ms, start_norms=("l2", "l2"))
    yield V, "start_norms must have one entry per member (2), got 3", \
        lambda: mimo_msd(mimo, mx, my, **ms, random_start=True, start_norms=("l2",) * 3)
    yield V, "start_norms: ['l1'] must be among norms ('linf', 'l2') (their eps is the radius)", \
        lambda: mimo_msd(mimo, mx, my, **ms, random_start=True, start_norms=("l1", "l2"))
    # inputs
    yield T, "x must be a floating-point tensor, got torch.int64", \
        lambda: PGD(net, **pgd)(torch.zeros(2, 1, 2, 2, dtype=torch.long), y)
    yield T, "x must be a floating-point tensor, got list", lambda: PGD(net, **pgd)([0.5, 0.5], y)
    yield T, "y must be an integer tensor of class labels, got torch.float32", lambda: PGD(net, **pgd)(x, y.float())
    yield V, "y must be [B] = (2,) to match x, got shape (2, 1)", lambda: PGD(net, **pgd)(x, y[:, None])
    yield V, "y must be [B, M] = (2, 2) to match x, got shape (2,)", lambda: mimo_pgd(mimo, mx, my[:, 0], **mp)
    yield V, "x must be [B, ...] with at least one feature dimension, got shape (2,)", \
        lambda: PGD(net, **pgd)(x.flatten()[:2], y)
    yield V, "x must be [B, M, ...] with at least one feature dimension, got shape (2, 2)", \
        lambda: mimo_pgd(mimo, mx[..., 0], my, **mp)
    yield V, "y must be on x's device cpu, got meta", lambda: PGD(net, **pgd)(x, y.to("meta"))
    yield V, "x must hold data: an attack cannot run on meta tensors", \
        lambda: PGD(net, **pgd)(x.to("meta"), y.to("meta"))
    yield V, "x must be finite, got NaN or infinity", lambda: PGD(net, **pgd)(x.clone().fill_(math.nan), y)
    low = x.clone()
    low[0, 0, 0, 0] = -0.5
    yield V, "x must lie in the box [0.0, 1.0], got values in [-0.5, 0.5]", lambda: PGD(net, **pgd)(low, y)
    yield V, "y must hold class labels >= 0, got -1", lambda: PGD(net, **pgd)(x, y - 1)
    yield V, "y must hold class labels in [0, 3) for the model's 3 classes, got 3", \
        lambda: mimo_pgd(mimo, mx, my + 3, **mp)
    yield V, "model must return logits of shape (2,) + (K,), got (1, 3)", lambda: PGD(lambda t: net(t)[:1], **pgd)(x, y)
    yield V, "model must return logits of shape (2,) + (K,), got tuple", lambda: PGD(lambda t: (net(t),), **pgd)(x, y)


MESSAGES = list(message_cases())


@pytest.mark.parametrize("index", range(len(MESSAGES)), ids=[m[1][:40] for m in MESSAGES])
def test_error_messages_name_the_argument_and_the_value(index):
    exc, message, call = MESSAGES[index]
    raises(exc, message, call)


def test_repr_shows_every_setting():
    net = _linear3()
    assert repr(PGD(net, norm="l2", eps=0.5, alpha=0.1, steps=3, loss="margin")) == (
        "PGD(norm='l2', eps=0.5, alpha=0.1, steps=3, k=20, random_start=False, restarts=1, "
        "projection='exact', loss='margin', box=(0.0, 1.0))")
    assert repr(MSD(net, eps=[0.1, 0.5, 2.0], alpha=0.1, steps=2, k_range=(2, 4), select="batch")) == (
        "MSD(norms=('linf', 'l2', 'l1'), eps=(0.1, 0.5, 2.0), alpha=(0.1, 0.1, 0.1), steps=2, k=(20, 20, 20), "
        "select='batch', k_range=(2, 4), score='auto', projection='exact', box=(0.0, 1.0))")


# ---------------------------------------------------------------------------------------------
# accepted argument forms

def test_tensor_and_numpy_arguments_are_read_as_their_values():
    w = ramp(N)
    x = torch.full((3, N), 0.5, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    pgd = PGD(Wrong(w), norm="linf", eps=torch.tensor(0.25), alpha=np.float64(0.125), steps=1,
              random_start=np.False_)
    assert pgd.eps == 0.25 and type(pgd.eps) is float and pgd.random_start is False
    assert torch.equal(pgd(x, y), x + 0.125 * w.sign())
    # per-member parameters as 1-D tensors, the same attack as lists
    mw = torch.stack([ramp(N), -ramp(N)])
    mx = torch.full((3, 2, N), 0.5, dtype=torch.float64)
    my = torch.zeros(3, 2, dtype=torch.long)
    kw = dict(norms=("l1", "l1"), steps=1, random_start=np.True_, box=(-10.0, 10.0))
    torch.manual_seed(0)
    a = mimo_pgd(SlotWrong(mw), mx, my, eps=torch.tensor([4.0, 4.0]), alpha=torch.tensor([0.0, 0.0]),
                 k=torch.tensor([3, 3]), **kw)
    torch.manual_seed(0)
    b = mimo_pgd(SlotWrong(mw), mx, my, eps=[4.0, 4.0], alpha=[0.0, 0.0], k=[3, 3], **kw)
    assert torch.equal(a, b) and not torch.equal(a, mx)


def test_degenerate_box_and_inputs_on_its_edges_are_accepted():
    w = ramp(N)
    y = torch.zeros(2, dtype=torch.long)
    x = torch.full((2, N), 0.5, dtype=torch.float64)
    assert torch.equal(PGD(Wrong(w), norm="linf", eps=0.1, alpha=0.1, steps=1, box=(0.5, 0.5))(x, y), x)
    edge = torch.zeros(2, N, dtype=torch.float64)
    edge[:, ::2] = 1.0
    out = PGD(Wrong(w), norm="linf", eps=0.25, alpha=0.25, steps=1)(edge, y)
    assert torch.equal(out, (edge + 0.25 * w.sign()).clamp(0, 1))


# ---------------------------------------------------------------------------------------------
# defaults, k, box and projection reach every step

def _l1_moved(out, x):
    return int((out != x).sum())


def test_default_l1_sparsity_is_20_and_k_is_passed_on():
    w = ramp(64)
    x = torch.full((1, 64), 0.5, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.long)
    l1 = dict(eps=100.0, alpha=2.0, steps=1)
    assert _l1_moved(PGD(Wrong(w), norm="l1", **l1)(x, y), x) == 20
    assert _l1_moved(PGD(Wrong(w), norm="l1", k=3, **l1)(x, y), x) == 3
    assert _l1_moved(MSD(Wrong(w), norms=("l1",), **l1)(x, y), x) == 20
    mw = torch.stack([w, -w])
    mx = x.expand(1, 2, 64).clone()
    my = torch.zeros(1, 2, dtype=torch.long)
    assert _l1_moved(mimo_pgd(SlotWrong(mw), mx, my, norms="l1", **l1), mx) == 2 * 20
    assert _l1_moved(mimo_msd(SlotWrong(mw), mx, my, norms=("l1",), **l1), mx) == 2 * 20


def test_every_attack_steps_inside_the_given_box():
    """x = 0.9 with a wide box (-1, 2): one linf step of 0.5 lands on 1.4 / 0.4 by sign(w); a
    default (0, 1) box would cut it at 1."""
    w = ramp(N)
    x = torch.full((2, N), 0.9, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    want = x + 0.5 * w.sign()
    box = (-1.0, 2.0)
    assert torch.equal(FGSM(Wrong(w), eps=0.5, box=box)(x, y), want)
    assert torch.equal(BIM(Wrong(w), eps=0.5, alpha=0.5, steps=1, box=box)(x, y), want)
    assert torch.equal(PGD(Wrong(w), norm="linf", eps=0.5, alpha=0.5, steps=1, box=box)(x, y), want)
    assert torch.equal(MSD(Wrong(w), norms=("linf",), eps=0.5, alpha=0.5, steps=1, box=box)(x, y), want)
    mw = torch.stack([w, w])
    mx, my = x[:, None].expand(2, 2, N).clone(), torch.zeros(2, 2, dtype=torch.long)
    mwant = want[:, None].expand(2, 2, N)
    assert torch.equal(mimo_pgd(SlotWrong(mw), mx, my, norms="linf", eps=0.5, alpha=0.5, steps=1, box=box), mwant)
    assert torch.equal(mimo_msd(SlotWrong(mw), mx, my, norms=("linf",), eps=0.5, alpha=0.5, steps=1, box=box), mwant)


def test_sequential_projection_reaches_every_step():
    """An l2 step of 2 eps from x next to the top of the box: "sequential" scales it back to
    eps * w / ||w|| and then clamps to the box; "exact" keeps norm eps by moving the free
    coordinates further, so the two differ."""
    w = torch.linspace(1.0, 2.0, N, dtype=torch.float64)
    x = torch.full((1, N), 0.5, dtype=torch.float64)
    x[0, N // 2:] = 0.95
    y = torch.zeros(1, dtype=torch.long)
    eps = 0.6
    want = (x + eps * w / w.norm()).clamp(0, 1)
    seq = dict(norm="l2", eps=eps, alpha=2 * eps, steps=1, projection="sequential")
    got = PGD(Wrong(w), **seq)(x, y)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    exact = PGD(Wrong(w), **{**seq, "projection": "exact"})(x, y)
    assert (exact - want).abs().max() > 1e-3
    msd = MSD(Wrong(w), norms=("l2",), eps=eps, alpha=2 * eps, steps=1, projection="sequential")(x, y)
    torch.testing.assert_close(msd, want, rtol=0, atol=1e-12)
    mw, mx, my = w[None].expand(2, N), x[:, None].expand(1, 2, N).clone(), torch.zeros(1, 2, dtype=torch.long)
    mp = mimo_pgd(SlotWrong(mw), mx, my, norms="l2", eps=eps, alpha=2 * eps, steps=1, projection="sequential")
    torch.testing.assert_close(mp, want[:, None].expand(1, 2, N), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# random starts

def test_random_start_sequential_is_the_draw_clamped_to_the_box():
    x = torch.full((4, N), 0.9, dtype=torch.float64)
    torch.manual_seed(3)
    raw = random_start(x, ["l2"], [0.5], (-10.0, 10.0), "sequential")  # box never binds: the draw
    torch.manual_seed(3)
    seq = random_start(x, ["l2"], [0.5], (0.0, 1.0), "sequential")
    torch.testing.assert_close(seq, (x + raw).clamp(0, 1) - x, rtol=0, atol=1e-15)
    assert (seq != raw).any()                                 # the box did bind


def test_linf_random_start_is_uniform_in_the_cube_at_full_precision():
    torch.manual_seed(0)
    x = torch.zeros(2000, N, dtype=torch.float64)
    d = random_start(x, ["linf"], [2.0], (-10.0, 10.0), "exact")
    assert d.abs().max() <= 2.0
    assert abs(d.abs().mean().item() - 1.0) < 0.02           # |U(-2, 2)| has mean 1
    assert abs(d.mean().item()) < 0.02
    assert not torch.equal(d[0], d[1])                        # one draw per row
    assert (d.float().double() != d).any()                   # drawn in x's dtype (float64)


def test_l2_random_start_radius_is_drawn_in_x_dtype():
    """||d|| / eps is the radius U^(1/n): drawn in float64 it is not a float32 number."""
    torch.manual_seed(0)
    x = torch.zeros(200, N, dtype=torch.float64)
    r = random_start(x, ["l2"], [2.0], (-10.0, 10.0), "exact").norm(dim=1) / 2.0
    assert ((r - r.float().double()).abs() / r).max() > 1e-12


def test_radius_law_with_one_feature():
    """n = 1: the uniform law on [-eps, eps] has |d| / eps ~ U(0, 1), mean 1/2."""
    torch.manual_seed(0)
    x = torch.zeros(4000, 1, dtype=torch.float64)
    for norm in ("l2", "l1"):
        r = random_start(x, [norm], [2.0], (-10.0, 10.0), "exact").abs() / 2.0
        assert abs(r.mean().item() - 0.5) < 0.02, norm


def test_mimo_pgd_draws_each_slot_from_its_own_ball():
    """alpha = 0: the attack returns its start. Slot m lies in its own norm's ball, and the l1
    slot reaches far beyond the small linf cube of slot 0."""
    torch.manual_seed(0)
    x = torch.zeros(32, 3, N, dtype=torch.float64)
    y = torch.zeros(32, 3, dtype=torch.long)
    mw = torch.ones(3, N, dtype=torch.float64)
    d = mimo_pgd(SlotWrong(mw), x, y, norms=("linf", "l2", "l1"), eps=(0.05, 1.5, 6.0), alpha=0.0, steps=1,
                 random_start=True, box=(-10.0, 10.0)) - x
    assert d[:, 0].abs().amax() <= 0.05 and d[:, 0].abs().amax() > 0.04
    assert (d[:, 1].norm(dim=-1) <= 1.5 + 1e-12).all() and (d[:, 1].norm(dim=-1) > 0.5).all()
    assert (d[:, 2].abs().sum(-1) <= 6.0 + 1e-12).all() and (d[:, 2].abs().sum(-1) > 3.2).all()


def test_mimo_msd_start_defaults_to_the_first_norm_when_norms_do_not_match_members():
    torch.manual_seed(0)
    x = torch.zeros(32, 3, N, dtype=torch.float64)
    y = torch.zeros(32, 3, dtype=torch.long)
    d = mimo_msd(SlotWrong(torch.ones(3, N, dtype=torch.float64)), x, y, norms=("linf", "l2"), eps=(0.05, 1.5),
                 alpha=0.0, steps=1, random_start=True, box=(-10.0, 10.0)) - x
    assert d.abs().amax() <= 0.05
    assert (d.abs().amax(-1) > 0.025).all()                   # every slot spreads over its linf cube


def test_random_start_caps_a_radius_beyond_the_dtype():
    torch.manual_seed(0)
    x = torch.full((3, N), 0.5)
    attack = PGD(Wrong(torch.ones(N)), norm="l2", eps=1e39, alpha=0.0, steps=1, random_start=True)
    out = attack(x, torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)


# ---------------------------------------------------------------------------------------------
# PGD restarts: fooled first, then the higher loss, ties to the earlier run

def test_restarts_keep_the_fooling_run_then_the_higher_loss():
    """alpha = 0, so each run ends at its random start; the loss is MINUS the margin, so the
    highest-loss run is the least fooled one and the two parts of the rule disagree."""
    torch.manual_seed(0)
    w = torch.randn(N, dtype=torch.float64)
    x = torch.rand(6, N, dtype=torch.float64) * 0.6 + 0.2
    # examples 0-2 sit on the decision boundary (some runs fool them), 3-5 far from it (none do)
    offset = -(x @ w) - torch.tensor([0.0] * 3 + [100.0] * 3, dtype=torch.float64)

    def model(t):
        wrong = t @ w + offset[: t.shape[0]]
        return torch.stack([torch.zeros_like(wrong), wrong], -1)

    y = torch.zeros(6, dtype=torch.long)
    loss = lambda z, t: -margin_loss(z, t)  # noqa: E731
    restarts, eps = 4, 0.2
    torch.manual_seed(7)
    starts = [random_start(x, ["linf"], [eps], (0.0, 1.0), "exact") for _ in range(restarts)]
    want = []
    for b in range(6):
        runs = []
        for r, d in enumerate(starts):
            z = model(x + d)[b]
            runs.append((bool(z[1] > z[0]), float(z[0] - z[1]), -r, d[b]))
        want.append(max(runs, key=lambda s: s[:3])[3])
    fooled = [max(bool((model(x + d)[b, 1] > model(x + d)[b, 0])) for d in starts) for b in range(6)]
    assert any(fooled) and not all(fooled)  # both branches of the rule are exercised
    torch.manual_seed(7)
    got = PGD(model, norm="linf", eps=eps, alpha=0.0, steps=1, random_start=True, restarts=restarts, loss=loss)(x, y)
    torch.testing.assert_close(got, x + torch.stack(want), rtol=0, atol=0)


def test_restarts_tie_keeps_the_first_run():
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    model = lambda t: bias.expand(t.shape[0], 3)  # noqa: E731  (constant: every run ties)
    x = torch.full((4, N), 0.5, dtype=torch.float64)
    torch.manual_seed(1)
    first = random_start(x, ["l2"], [0.3], (0.0, 1.0), "exact")
    torch.manual_seed(1)
    attack = PGD(model, norm="l2", eps=0.3, alpha=0.1, steps=2, random_start=True, restarts=3)
    got = attack(x, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(got, x + first, rtol=0, atol=0)


def test_models_constant_in_x_leave_x_unchanged():
    """Zero gradient: no graph at all (no parameters), or parameters but no path to x."""
    x = torch.full((2, N), 0.5, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    for model in (lambda t: torch.zeros(t.shape[0], 3, dtype=t.dtype), lambda t: bias.expand(t.shape[0], 3)):
        for norm in ("linf", "l2", "l1"):
            assert torch.equal(PGD(model, norm=norm, eps=0.3, alpha=0.1, steps=2)(x, y), x)
    assert bias.grad is None


def test_a_loss_error_on_an_empty_batch_is_passed_on():
    def loss(z, t):
        raise RuntimeError("boom")

    x = torch.zeros(0, N, dtype=torch.float64)
    raises(RuntimeError, "boom", lambda: PGD(Wrong(torch.ones(N, dtype=torch.float64)), norm="l2", eps=0.1,
                                             alpha=0.1, steps=1, loss=loss)(x, torch.zeros(0, dtype=torch.long)))


def test_margin_loss_on_members():
    z = torch.tensor([[[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]],
                      [[5.0, -2.0, 4.5], [1.0, 1.0, 7.0]]])             # [B=2, M=2, K=3]
    y = torch.tensor([[0, 2], [1, 2]])
    # max over the other classes minus the true one, by hand
    assert torch.equal(margin_loss(z, y), torch.tensor([[1.0 - 2.0, 3.0 - 1.0], [5.0 + 2.0, 1.0 - 7.0]]))


# ---------------------------------------------------------------------------------------------
# MSD: ties, the batch rule for single models, k_range, defaults of msd_iterate

@pytest.mark.parametrize("norms,moved", [(("l1", "linf"), 2), (("linf", "l1"), N)])
def test_msd_ties_keep_the_earlier_norm(norms, moved):
    """wrong = sum(x): the l1 step (k = 2, 1.0 on two pixels) and the linf step (0.125 on all 16)
    both raise sum(x) by exactly 2, so the two candidates tie and the first norm listed wins."""
    params = {"l1": (2.0, 2.0), "linf": (0.125, 0.125)}
    x = torch.zeros(1, N, dtype=torch.float64)
    out = MSD(Wrong(torch.ones(N, dtype=torch.float64)), norms=norms, eps=[params[p][0] for p in norms],
              alpha=[params[p][1] for p in norms], k=2, steps=1, box=(0.0, 4.0))(x, torch.zeros(1, dtype=torch.long))
    assert out.sum() == 2.0 and int((out > 0).sum()) == moved


class SquareWrong(nn.Module):
    """``[B, N] -> [B, 2]``, wrong-class logit ``0.5 * ||x||^2`` (gradient x itself)."""

    def forward(self, x):
        wrong = 0.5 * x.pow(2).sum(-1)
        return torch.stack([torch.zeros_like(wrong), wrong], -1)


def test_msd_batch_rule_on_a_single_model():
    """Example 0 one bright pixel (l1 wins alone), example 1 uniformly grey (linf wins, and wins
    the batch sum): "batch" moves both by linf, "example" each by its own norm."""
    x = torch.zeros(2, N)
    x[0, 0] = 0.5
    x[1] = 0.5
    y = torch.zeros(2, dtype=torch.long)
    kw = dict(norms=("linf", "l2", "l1"), eps=(0.1, 0.2, 1.0), alpha=(0.1, 0.2, 1.0), k=1, steps=1)
    linf = x + 0.1 * (x > 0)                               # sign of the gradient x
    l1 = x.clone()
    l1[0, 0] = 1.0                                         # the whole l1 step on the largest pixel, capped by the box
    torch.testing.assert_close(MSD(SquareWrong(), select="batch", **kw)(x, y), linf)
    want = torch.stack([l1[0], linf[1]])
    torch.testing.assert_close(MSD(SquareWrong(), select="example", **kw)(x, y), want)


def test_msd_iterate_defaults_to_the_example_rule():
    """The Bump loss of test_msd_rules: steps overshoot, the best iterate is 0.1 and the last 0.2."""
    class Bump(nn.Module):
        def forward(self, x):
            d = (x - 0.5).flatten(1).norm(dim=-1)
            wrong = d - 10 * (d - 0.15).clamp_min(0)
            return torch.stack([torch.zeros_like(wrong), wrong], -1)

    x = torch.full((1, 4), 0.5) + torch.tensor([1e-3, 0, 0, 0])
    kw = dict(norms=["l2"], eps=[1.0], alpha=[0.1], k=[20], steps=4, box=(0.0, 1.0), projection="exact")
    d = msd_iterate(Bump(), x, torch.zeros(1, dtype=torch.long), **kw)
    assert d.norm().item() == pytest.approx(0.1, abs=2e-3)


def test_k_range_on_a_single_model():
    w = ramp(64)
    x = torch.full((1, 64), 0.5, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.long)
    for lo_hi, moved in (((1, 1), 1), ((4, 4), 4)):
        out = MSD(Wrong(w), norms=("l1",), eps=100.0, alpha=2.0, steps=1, k=20, k_range=lo_hi)(x, y)
        assert _l1_moved(out, x) == moved, lo_hi


def test_k_range_draws_one_sparsity_per_step_from_the_global_rng():
    w = ramp(64)
    x = torch.full((1, 64), 0.5, dtype=torch.float64)
    torch.manual_seed(11)
    MSD(Wrong(w), norms=("l1",), eps=100.0, alpha=2.0, steps=3, k_range=(2, 9))(x, torch.zeros(1, dtype=torch.long))
    after = torch.rand(4)
    torch.manual_seed(11)
    for _ in range(3):
        torch.randint(2, 10, (1,))  # one draw per step for the single slot
    assert torch.equal(after, torch.rand(4))


def test_k_range_covers_both_ends_per_slot():
    torch.manual_seed(0)
    m = 8
    mw = torch.stack([ramp(64)] * m)
    x = torch.full((2, m, 64), 0.5, dtype=torch.float64)
    out = mimo_msd(SlotWrong(mw), x, torch.zeros(2, m, dtype=torch.long), norms=("l1",), eps=100.0, alpha=2.0,
                   steps=1, k_range=(2, 3))
    moved = (out != x).sum(-1)                                  # [B, M]
    assert (moved[0] == moved[1]).all()                         # one draw per slot
    assert set(moved[0].tolist()) == {2, 3}                     # both ends, different slots differ


# ---------------------------------------------------------------------------------------------
# MIMO gradients

def test_mimo_gradient_at_a_given_delta():
    """SlotWrong with label 0: dL_m/dx_m = sigmoid(w_m . (x_m + delta_m)) * w_m, other slots 0."""
    mw = torch.stack([ramp(N), -2 * ramp(N)]) / N
    x = torch.full((1, 2, N), 0.5, dtype=torch.float64)
    delta = torch.zeros_like(x)
    delta[0, 0, :4] = 0.25
    g = mimo_gradient(SlotWrong(mw), x, torch.zeros(1, 2, dtype=torch.long), delta=delta)
    s = torch.sigmoid(((x + delta)[0] * mw).sum(-1))           # [M]
    torch.testing.assert_close(g[0], s[:, None] * mw, rtol=1e-12, atol=0)


def test_cross_gradient_ratio_leaves_out_examples_without_a_true_gradient():
    """Member m: wrong = relu(x_m . 1 - 4) + 0.5 * x_other . 1. Example 0 (x = 0.1): the relu is
    off, its own gradient is zero, so it leaves the mean; example 1 (x = 0.5): own gradient
    s_m * 1, cross 0.5 * s_other * 1, ratio 0.5 * s_other / s_m with s = sigmoid(wrong) (the CE
    gradient of logits [0, wrong] at label 0)."""
    def model(x):
        s = x.sum(-1)                                           # [B, 2]
        wrong = torch.relu(s - 4) + 0.5 * s.flip(1)
        return torch.stack([torch.zeros_like(wrong), wrong], -1)

    x = torch.stack([torch.full((2, N), 0.1), torch.full((2, N), 0.5)]).double()
    got = cross_gradient_ratio(model, x, torch.zeros(2, 2, dtype=torch.long))
    # both members see wrong = 8 - 4 + 0.5 * 8, so s_other / s_m = 1
    torch.testing.assert_close(got, torch.full((2,), 0.5, dtype=torch.float64), rtol=1e-12, atol=0)
