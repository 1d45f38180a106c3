"""What every training method trains on, and its outer loss, pinned by value.

A spy records what each attack returned and what the training forward received: an
adversarial method must train on exactly its attack's output (not the clean batch), an
unattacked one on the clean batch (or its MIMO shuffles). The outer loss is recomputed from
the recorded inputs with the formula of the method's paper and compared by value.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import pyens.attacks
import pyens.nn
from pyens.training import METHODS, TrainConfig, build_network
from pyens.training.methods import StepContext, get_method

ATTACKS = ("PGD", "MSD", "mimo_pgd", "mimo_msd")
B, M, K = 6, 3, 10


def _data():
    return SimpleNamespace(image_shape=(1, 28, 28), num_classes=K, mean=(0.1307,), std=(0.3081,))


class Spy(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


def _record(monkeypatch):
    """Wrap the attacks and mimo_batch so that their outputs are recorded in order."""
    log = SimpleNamespace(attacks=[], batches=[])
    for name in ATTACKS:
        real = getattr(pyens.attacks, name)
        if isinstance(real, type):
            class Recorded(real):
                def __call__(self, x, y, _log=log):
                    out = super().__call__(x, y)
                    _log.attacks.append(out)
                    return out
            monkeypatch.setattr(pyens.attacks, name, Recorded)
        else:
            def recorded(*a, _real=real, **kw):
                out = _real(*a, **kw)
                log.attacks.append(out)
                return out
            monkeypatch.setattr(pyens.attacks, name, recorded)
    real_batch = pyens.nn.mimo_batch

    def batch(*a, **kw):
        out = real_batch(*a, **kw)
        log.batches.append(out)
        return out
    monkeypatch.setattr(pyens.nn, "mimo_batch", batch)
    return log


def _run(method, monkeypatch, **cfg):
    log = _record(monkeypatch)
    cfg = TrainConfig(method=method, steps=2, members=M, **cfg).resolved()
    torch.manual_seed(0)
    net = build_network(cfg, _data())
    spy = Spy(net)
    ctx = StepContext(net=net, train_net=spy, cfg=cfg, generator=torch.Generator().manual_seed(0))
    x, y = torch.rand(B, 1, 28, 28), torch.randint(0, K, (B,))
    out = get_method(method).loss(ctx, x, y)
    assert len(spy.inputs) == 1, "one training forward per batch"
    return SimpleNamespace(log=log, net=net, cfg=cfg, x=x, y=y, out=out, seen=spy.inputs[0])


def _members_ce(net, xin, ym):
    """Per-member batch-mean cross-entropy ``[M]`` of ``net(xin [B, M, ...])``."""
    z = net(xin)
    return torch.stack([F.cross_entropy(z[:, j], ym[:, j]) for j in range(z.shape[1])])


def _expected(method, r):
    """(training input, loss) the method's paper prescribes, from the recorded pieces."""
    net, x, y, log = r.net, r.x, r.y, r.log
    same = (x.unsqueeze(1).expand(-1, M, *x.shape[1:]), y.unsqueeze(1).expand(-1, M))
    if method == "standard":
        return x, F.cross_entropy(net(x), y)
    if method in ("at", "msd"):
        (adv,) = log.attacks
        return adv, F.cross_entropy(net(adv), y)
    if method in ("avg", "max"):
        assert len(log.attacks) == M
        per = torch.stack([F.cross_entropy(net(a), y, reduction="none") for a in log.attacks])  # [M, B]
        return torch.cat(log.attacks), per.mean() if method == "avg" else per.max(0).values.mean()
    if method == "mimo":
        (xm, ym), = log.batches
        return xm, _members_ce(net, xm, ym).sum()
    if method in ("mat", "mat_same", "mimo_at", "mat_msd"):
        (_, ym), = log.batches
        (adv,) = log.attacks
        per = _members_ce(net, adv, ym)
        return adv, per.sum() if r.cfg.outer == "sum" else per.max()
    if method == "ensemble_at":
        (adv,) = log.attacks
        return adv, _members_ce(net, adv, same[1]).sum()
    if method == "ensemble":
        return same[0], _members_ce(net, *same).sum()
    if method in ("dml", "dml_at"):
        penalty = net.penalty(0.01, 0.01)  # the DML paper's gamma, beta (the defaults)
        if method == "dml":
            return same[0], _members_ce(net, *same).sum() + penalty
        (adv,) = log.attacks
        return adv, _members_ce(net, adv, same[1]).sum() + penalty
    raise AssertionError(f"no expectation written for method {method!r}: add one")


ATTACKED = {"at", "msd", "avg", "max", "mat", "mat_same", "mimo_at", "mat_msd", "ensemble_at", "dml_at"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_on_its_attack_output_with_its_outer_loss(method, monkeypatch):
    r = _run(method, monkeypatch)
    want_input, want_loss = _expected(method, r)
    torch.testing.assert_close(r.seen, want_input.detach(), rtol=0, atol=0)
    if method in ATTACKED:  # and the attack did move the inputs: not the clean batch by accident
        clean = r.x if r.seen.dim() == 4 and r.seen.shape[0] == B else None
        moved = (r.seen - (clean if clean is not None else r.seen.new_zeros(()))).abs().amax()
        assert r.log.attacks and moved > 0
        if r.log.batches:
            assert not torch.equal(r.seen, r.log.batches[0][0]), "trained on the clean MIMO batch"
    torch.testing.assert_close(r.out.loss, want_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["mat", "mat_msd", "mimo_at"])
def test_outer_max_is_the_worst_member_not_the_mean(method, monkeypatch):
    r = _run(method, monkeypatch, outer="max")
    want_input, want_loss = _expected(method, r)
    per = _members_ce(r.net, want_input, r.log.batches[0][1])
    assert per.max() - per.mean() > 1e-4  # the members differ, so max != mean
    torch.testing.assert_close(r.out.loss, want_loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("select", ["example", "batch"])
def test_mat_msd_trains_on_its_configured_msd_rule(select, monkeypatch):
    seen = {}
    real = pyens.attacks.mimo_msd

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)
    monkeypatch.setattr(pyens.attacks, "mimo_msd", spy)
    cfg = TrainConfig(method="mat_msd", steps=1, members=M, msd_select=select, random_start=True,
                      k_range=(5, 20)).resolved()
    net = build_network(cfg, _data())
    ctx = StepContext(net=net, train_net=net, cfg=cfg, generator=torch.Generator().manual_seed(0))
    get_method("mat_msd").loss(ctx, torch.rand(4, 1, 28, 28), torch.randint(0, K, (4,)))
    assert (seen["select"], seen["random_start"], seen["k_range"]) == (select, True, (5, 20))
