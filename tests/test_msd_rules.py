"""MSD's two selection rules: per example (Maini et al.) and per member over the batch (the MAT
authors' code), on a constructed MIMO model whose strongest norm per slot and example is known."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pyens.attacks import MSD, mimo_msd
from pyens.attacks.msd import msd_iterate
from pyens.ops import lp_step

N = 16
# linf moves every coordinate by 0.1, l2 spreads 0.2, l1 (k = 1) puts 1.0 on one coordinate.
PARAMS = dict(norms=("linf", "l2", "l1"), eps=(0.1, 0.2, 1.0), alpha=(0.1, 0.2, 1.0), k=1)


class Quadratic(nn.Module):
    """Two classes per slot; member m's wrong-class logit is ``0.5 * sum_i x[:, m, i]^2``.

    Its input gradient is ``x`` itself (times a positive factor), so a slot holding one bright
    pixel has a one-hot gradient (the l1 step gains most) and a uniformly grey slot a dense one
    (the linf step gains most). Member m reads slot m only.
    """

    def forward(self, x):
        wrong = 0.5 * x.pow(2).flatten(2).sum(-1)                # [B, M]
        return torch.stack([torch.zeros_like(wrong), wrong], -1)  # [B, M, 2]


def _inputs():
    sparse = torch.zeros(N)
    sparse[0] = 0.5
    dense = torch.full((N,), 0.5)
    # slot 0: example 0 sparse (l1 wins), example 1 dense (linf wins, and wins the batch sum);
    # slot 1: both sparse (l1 wins for each and for the batch).
    x = torch.stack([torch.stack([sparse, sparse]), torch.stack([dense, sparse])])  # [B=2, M=2, N]
    return x, torch.zeros(2, 2, dtype=torch.long)


def _candidates(x):
    grad = x.clone()  # the direction of the true gradient (positive factor per unit)
    return {p: lp_step(torch.zeros_like(x), grad, x, norm=p, eps=e, alpha=a, k=1, members=2)
            for p, e, a in zip(PARAMS["norms"], PARAMS["eps"], PARAMS["alpha"])}


def test_batch_rule_moves_each_slot_by_its_members_strongest_norm_over_the_batch():
    x, y = _inputs()
    cand = _candidates(x)
    out = mimo_msd(Quadratic(), x, y, steps=1, select="batch", **PARAMS) - x
    # slot 0: linf for BOTH examples, although example 0 alone would take l1
    torch.testing.assert_close(out[:, 0], cand["linf"][:, 0])
    # slot 1: l1 for both
    torch.testing.assert_close(out[:, 1], cand["l1"][:, 1])


def test_example_rule_moves_each_unit_by_its_own_strongest_norm():
    x, y = _inputs()
    cand = _candidates(x)
    out = mimo_msd(Quadratic(), x, y, steps=1, select="example", **PARAMS) - x
    torch.testing.assert_close(out[0, 0], cand["l1"][0, 0])
    torch.testing.assert_close(out[1, 0], cand["linf"][1, 0])
    torch.testing.assert_close(out[:, 1], cand["l1"][:, 1])


def test_the_two_rules_agree_on_one_unit():
    """B = 1, M = 1: the batch is the example, so both rules pick the same norm at every step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(2), nn.Linear(N, 3)).eval()  # [B, 1, N] -> [B, 1, 3]
    x, y = torch.rand(1, 1, N), torch.tensor([[2]])
    kw = dict(eps=[0.2, 0.5, 2.0], alpha=[0.05, 0.2, 0.8], k=[3] * 3, steps=6, box=(0.0, 1.0),
              projection="exact", members=1, norms=["linf", "l2", "l1"])
    a = msd_iterate(net, x, y, select="example", keep="last", **kw)
    b = msd_iterate(net, x, y, select="batch", **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.abs().sum() > 0


def test_the_two_rules_agree_with_one_norm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(2), nn.Linear(N, 3)).eval()
    x, y = torch.rand(5, 2, N), torch.randint(0, 3, (5, 2))
    kw = dict(norms=["l2"], eps=[0.5], alpha=[0.2], k=[20], steps=4, box=(0.0, 1.0), projection="exact",
              members=2)
    torch.testing.assert_close(msd_iterate(net, x, y, select="example", keep="last", **kw),
                               msd_iterate(net, x, y, select="batch", **kw), rtol=0, atol=0)


@pytest.mark.parametrize("select", ["example", "batch"])
def test_stacked_and_per_norm_scoring_give_the_same_attack(select):
    from pyens.nn import MIMO

    torch.manual_seed(0)
    net = MIMO("small_cnn", members=3, in_channels=1, num_classes=10).eval()
    x, y = torch.rand(5, 3, 1, 28, 28), torch.randint(0, 10, (5, 3))
    kw = dict(eps=[0.3, 2.0, 10.0], alpha=[0.1, 0.5, 2.5], steps=3, select=select)
    torch.testing.assert_close(mimo_msd(net, x, y, score="stacked", **kw),
                               mimo_msd(net, x, y, score="per_norm", **kw), rtol=0, atol=1e-6)


def test_batch_rule_returns_the_last_iterate_and_example_rule_the_best():
    """A loss that rises up to ||delta|| = 0.15 and drops beyond: steps of 0.1 overshoot, so the
    iterates go 0.1, 0.2, 0.1, 0.2. The example rule keeps 0.1 (the highest loss), the batch
    rule the last iterate, 0.2."""
    class Bump(nn.Module):
        def forward(self, x):
            d = (x - 0.5).flatten(2).norm(dim=-1)
            wrong = d - 10 * (d - 0.15).clamp_min(0)
            return torch.stack([torch.zeros_like(wrong), wrong], -1)

    x = torch.full((1, 1, 4), 0.5) + torch.tensor([1e-3, 0, 0, 0])
    y = torch.zeros(1, 1, dtype=torch.long)
    kw = dict(norms=("l2",), eps=1.0, alpha=0.1, steps=4)
    best = mimo_msd(Bump(), x, y, select="example", **kw) - x
    last = mimo_msd(Bump(), x, y, select="batch", **kw) - x
    assert best.norm() == pytest.approx(0.1, abs=2e-3)
    assert last.norm() == pytest.approx(0.2, abs=2e-3)


def test_random_start_draws_each_slot_from_its_own_ball():
    torch.manual_seed(0)
    x = torch.full((64, 3, 1, 8, 8), 0.5)
    y = torch.zeros(64, 3, dtype=torch.long)
    zero = lambda t: torch.zeros(*t.shape[:2], 2, dtype=t.dtype) + 0 * t.flatten(2).sum(-1, keepdim=True)  # noqa: E731
    # alpha 0: the attack never moves, so what comes back is the random start itself.
    out = mimo_msd(zero, x, y, norms=("l1", "l2", "linf"), eps=(6.0, 1.5, 0.2), alpha=0.0, steps=1,
                   random_start=True) - x
    d = out.flatten(2)
    assert (d[:, 0].abs().sum(-1) <= 6.0 + 1e-4).all() and (d[:, 0].abs().sum(-1) > 0.5).all()
    assert (d[:, 1].norm(dim=-1) <= 1.5 + 1e-4).all() and (d[:, 1].norm(dim=-1) > 0.5).all()
    assert (d[:, 2].abs().amax(-1) <= 0.2 + 1e-6).all() and (d[:, 2].abs().amax(-1) > 0.15).all()
    # the linf slot's start spreads over the whole cube, negative coordinates included
    assert d[:, 2].min() < -0.15


def test_k_range_draws_the_l1_sparsity_per_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(2), nn.Linear(64, 3)).eval()
    x, y = torch.rand(4, 2, 64) * 0.5 + 0.25, torch.randint(0, 3, (4, 2))
    out = mimo_msd(net, x, y, norms=("l1",), eps=100.0, alpha=1.0, steps=1, k_range=(5, 9)) - x
    moved = (out.abs() > 0).sum(-1)  # [B, M]: coordinates moved by the one l1 step
    assert ((moved >= 5) & (moved <= 9)).all()
    assert (moved == moved[0]).all(0).all()  # one draw per slot, shared by the batch


def _bad():
    net = nn.Sequential(nn.Flatten(2), nn.Linear(4, 2))
    x, y = torch.rand(2, 2, 4), torch.zeros(2, 2, dtype=torch.long)
    kw = dict(norms=("linf", "l2"), eps=0.1, alpha=0.1, steps=1)
    yield "select", lambda: mimo_msd(net, x, y, select="mean", **kw)
    yield "score", lambda: mimo_msd(net, x, y, score="fast", **kw)
    yield "k_range", lambda: mimo_msd(net, x, y, k_range=(9, 5), **kw)
    yield "k_range", lambda: mimo_msd(net, x, y, k_range=(0, 5), **kw)
    yield "k_range", lambda: mimo_msd(net, x, y, k_range=(5,), **kw)
    yield "start_norms", lambda: mimo_msd(net, x, y, start_norms=("linf", "l2"), **kw)
    yield "start_norms", lambda: mimo_msd(net, x, y, random_start=True, start_norms=("l1", "l2"), **kw)
    yield "random_start", lambda: mimo_msd(net, x, y, random_start="yes", **kw)
    yield "select", lambda: MSD(net, eps=0.1, alpha=0.1, steps=1, select="batches")


@pytest.mark.parametrize("name,call", list(_bad()))
def test_bad_options_name_the_option(name, call):
    with pytest.raises((ValueError, TypeError), match=name):
        call()


class QuadraticSingle(nn.Module):
    """:class:`Quadratic` for single-input models: ``[B, N] -> [B, 2]``."""

    def forward(self, x):
        wrong = 0.5 * x.pow(2).flatten(1).sum(-1)
        return torch.stack([torch.zeros_like(wrong), wrong], -1)


@pytest.mark.parametrize("mimo", [False, True])
def test_msd_continues_from_the_highest_loss_candidate(mimo):
    """A grey image: linf wins step 1 (every pixel +0.1, on the linf sphere); at step 2 the linf
    candidate stays put and the l2 / l1 candidates, projected back into their smaller balls,
    lose loss, so the attack stays at +0.1 everywhere. Continuing from another norm's
    candidate (the l1 one: one pixel at 1.0) would end elsewhere."""
    x = torch.full((1, N), 0.5)
    y = torch.zeros(1, dtype=torch.long)
    if mimo:
        out = mimo_msd(Quadratic(), x[:, None], y[:, None], steps=2, **PARAMS)[:, 0]
    else:
        out = MSD(QuadraticSingle(), steps=2, **PARAMS)(x, y)
    torch.testing.assert_close(out - x, torch.full((1, N), 0.1))


def _reference_msd(model, x, y, *, norms, eps, alpha, k, steps):
    """Maini et al.'s MSD written out one example at a time (float64): the oracle."""
    out, chosen_norms = [], set()
    for xb, yb in zip(x, y):
        xb, yb = xb[None], yb[None]
        loss = lambda d: torch.nn.functional.cross_entropy(model(xb + d), yb)  # noqa: E731
        delta, best, best_loss = torch.zeros_like(xb), None, -float("inf")
        for _ in range(steps):
            d = delta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss(d), d)
            scored = []
            for p, e, a in zip(norms, eps, alpha):
                c = lp_step(delta, g, xb, norm=p, eps=e, alpha=a, k=k)
                with torch.no_grad():
                    scored.append((loss(c).item(), -len(scored), c, p))
            top = max(scored, key=lambda s: s[:2])  # ties: the earlier norm
            chosen_norms.add(top[3])
            delta = top[2]
            if top[0] > best_loss:
                best, best_loss = delta, top[0]
        out.append(best)
    return torch.cat(out), chosen_norms


def test_msd_matches_the_one_example_reference_over_several_steps():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(N, 12), nn.Tanh(), nn.Linear(12, 4)).double().eval()
    x, y = torch.rand(9, N, dtype=torch.float64), torch.randint(0, 4, (9,))
    kw = dict(norms=("linf", "l2", "l1"), eps=(0.15, 0.6, 2.0), alpha=(0.06, 0.3, 0.9), k=2, steps=5)
    want, used = _reference_msd(net, x, y, **kw)
    assert len(used) >= 2  # the test means something only if the norms compete
    torch.testing.assert_close(MSD(net, **kw)(x, y) - x, want)
