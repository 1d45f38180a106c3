"""Training methods by value: outer losses on constructed logits, what each adversary is asked for.

Written to kill mutants of ``pyens/training/methods.py`` and ``pyens/training/dml_methods.py``
(issue 17, section 5). The networks are tiny constructed modules whose logits are their input
pixels, so every loss and accuracy below is worked out by hand. The attacks are replaced by
recorders: each method must hand its adversary exactly the configured norms, radii (after the
eps warm-up), step sizes, steps, k, random start and MSD rule, and train on what it returned.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyens.attacks
import pyens.nn
from pyens.training import methods as M
from pyens.training.dml_methods import DMLSettings
from pyens.training.method_base import METHODS, StepContext, describe, get_method, member_output

K = 4  # classes of the constructed networks


class PixelLogits(nn.Module):
    """Logits = the first K pixels times a scalar weight (1): ``[B, C, H, W] -> [B, K]`` and
    ``[B, M, C, H, W] -> [B, M, K]``. Records its training flag and inputs on every call."""

    def __init__(self, members: int = 3):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.members, self.num_classes, self.in_channels = members, K, None
        self.modes, self.inputs = [], []

    def forward(self, x):
        self.modes.append(self.training)
        self.inputs.append(x.detach().clone())
        return self.w * x.flatten(x.dim() - 3)[..., :K]


def _cfg(**kw):
    base = dict(norms=("l1", "l2", "linf"), eps=(8.0, 2.0, 0.4), alpha=(1.0, 0.5, 0.1), steps=3, k=5, k_range=(),
                random_start=True, msd_select="batch", eps_warmup=0.5, outer="sum", input_repetition=0.25,
                members=3, extra={})
    return SimpleNamespace(**{**base, **kw})


def _ctx(cfg, members=3, progress=0.25):
    net = PixelLogits(members)
    train = PixelLogits(members)  # a distinct training network: attacks must run on ctx.net
    return StepContext(net=net, train_net=train, cfg=cfg, generator=torch.Generator().manual_seed(3),
                       progress=progress)


def _record(monkeypatch):
    """Replace the attacks and mimo_batch by recorders; an attack returns ``x + 0.01 * (call index + 1)``."""
    log = []

    def shifted(x):
        return x + 0.01 * len(log)

    class FakePGD:
        def __init__(self, model, **kw):
            self.model, self.kw = model, kw

        def __call__(self, x, y):
            log.append(("PGD", self.model, self.kw, x, y))
            return shifted(x)

    class FakeMSD(FakePGD):
        def __call__(self, x, y):
            log.append(("MSD", self.model, self.kw, x, y))
            return shifted(x)

    def fake_fn(name):
        def f(model, x, y, **kw):
            log.append((name, model, kw, x, y))
            return shifted(x)
        return f

    batches = []

    def fake_batch(x, y, members, **kw):
        batches.append((members, kw))
        # slot m holds the batch rolled by m: a known, non-identical arrangement
        return (torch.stack([x.roll(m, 0) for m in range(members)], 1),
                torch.stack([y.roll(m, 0) for m in range(members)], 1))

    monkeypatch.setattr(pyens.attacks, "PGD", FakePGD)
    monkeypatch.setattr(pyens.attacks, "MSD", FakeMSD)
    monkeypatch.setattr(pyens.attacks, "mimo_pgd", fake_fn("mimo_pgd"))
    monkeypatch.setattr(pyens.attacks, "mimo_msd", fake_fn("mimo_msd"))
    monkeypatch.setattr(pyens.nn, "mimo_batch", fake_batch)
    return log, batches


def _xy(b=2, c=3):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, c, 2, 2, generator=g), torch.tensor([0, 3, 1, 2][:b])


# -- StepContext ----------------------------------------------------------------------------------

def test_eps_warmup_scales_radii_and_steps_linearly():
    cfg = SimpleNamespace(eps=(0.4, 2.0), alpha=(0.1, 0.5), eps_warmup=0.5)
    ctx = StepContext(None, None, cfg, torch.Generator(), progress=0.25)
    assert ctx.scale == 0.5 and ctx.eps == (0.2, 1.0) and ctx.alpha == (0.05, 0.25)
    assert StepContext(None, None, cfg, torch.Generator(), progress=0.75).scale == 1.0  # capped at 1
    assert StepContext(None, None, cfg, torch.Generator()).scale == 1.0  # default progress: done
    off = SimpleNamespace(eps=(0.4,), alpha=(0.1,), eps_warmup=0.0)
    ctx = StepContext(None, None, off, torch.Generator(), progress=0.0)
    assert ctx.scale == 1.0 and ctx.eps == (0.4,) and ctx.alpha == (0.1,)
    bare = SimpleNamespace(eps=(0.4,), alpha=(0.1,))  # a config without the field: no warm-up
    assert StepContext(None, None, bare, torch.Generator(), progress=0.0).scale == 1.0


# -- outer losses by hand -------------------------------------------------------------------------

L2, L4, L43 = math.log(2), math.log(4), math.log(4 / 3)


def _member_logits():
    """``[B=3, M=2, K=2]`` logits and labels with known CEs.

    member 0: [ln 3, 0] y=0 -> ln 4/3 (right); [ln 3, 0] y=1 -> ln 4 (wrong); [0, 0] y=0 -> ln 2 (right)
    member 1: [0, 0] y=0 -> ln 2 (right); [0, ln 3] y=1 -> ln 4/3 (right); [0, ln 3] y=0 -> ln 4 (wrong)
    """
    ln3 = math.log(3)
    z = torch.tensor([[[ln3, 0.0], [0.0, 0.0]],
                      [[ln3, 0.0], [0.0, ln3]],
                      [[0.0, 0.0], [0.0, ln3]]], dtype=torch.float64)
    y = torch.tensor([[0, 0], [1, 1], [0, 0]])
    return z, y


def test_member_output_sum_and_max_by_hand():
    z, y = _member_logits()
    m0, m1 = (L43 + L4 + L2) / 3, (L2 + L43 + L4) / 3
    out = member_output(z, y, "sum")
    assert out.loss.item() == pytest.approx(m0 + m1, rel=1e-12) and out.correct == 4 and out.seen == 6
    # the two members tie here; shift member 1 to make the max unambiguous
    z2 = z.clone()
    z2[2, 1] = torch.tensor([0.0, 0.0], dtype=torch.float64)  # member 1, example 2: [0, 0] y=0 -> ln 2, right
    m1b = (L2 + L43 + L2) / 3
    out = member_output(z2, y, "max")
    assert out.loss.item() == pytest.approx(max(m0, m1b), rel=1e-12) and out.correct == 5 and out.seen == 6
    assert member_output(z2, y, "sum").loss.item() == pytest.approx(m0 + m1b, rel=1e-12)


def test_standard_loss_and_accuracy_by_hand():
    net = PixelLogits()
    ctx = StepContext(net, net, _cfg(), torch.Generator())
    ln3 = math.log(3)
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    x[0, 0, 0, 0] = ln3   # logits [ln 3, 0, 0, 0], y=0: CE = log(3 + 3) - ln 3 = ln 2, right
    x[1, 0, 0, 1] = ln3   # logits [0, ln 3, 0, 0], y=2: CE = ln 6, wrong
    x[2, 0, 1, 1] = 1.0   # logits [0, 0, 0, 1], y=3: CE = log(3 + e) - 1, right
    y = torch.tensor([0, 2, 3])
    out = get_method("standard").loss(ctx, x, y)
    assert out.loss.item() == pytest.approx((L2 + math.log(6) + math.log(3 + math.e) - 1) / 3, rel=1e-12)
    assert (out.correct, out.seen) == (2, 3)


def test_plain_ensemble_gives_every_member_the_batch():
    net = PixelLogits(members=2)
    cfg = _cfg(members=2)
    x, y = _xy(b=3, c=3)
    out = get_method("ensemble").loss(StepContext(net, net, cfg, torch.Generator()), x, y)
    (seen,) = net.inputs
    assert seen.shape == (3, 2, 3, 2, 2) and torch.equal(seen[:, 0], x) and torch.equal(seen[:, 1], x)
    want = 2 * F.cross_entropy(x.flatten(1)[:, :K], y)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6) and out.seen == 6
    assert out.correct == 2 * int((x.flatten(1)[:, :K].argmax(1) == y).sum())


# -- avg / max: one PGD per norm, accuracy over the union ------------------------------------------

@pytest.mark.parametrize("name", ["avg", "max"])
def test_multi_perturbation_losses_and_union_accuracy(name, monkeypatch):
    log, _ = _record(monkeypatch)
    cfg = _cfg()
    ctx = _ctx(cfg)
    # logits = the two pixels of a [1, 1, 2] image; the attacks add 0.01, 0.02, 0.03 to both pixels
    x = torch.tensor([[[[1.0, 0.0]]], [[[0.5, 0.49]]], [[[0.0, 1.0]]]])
    y = torch.tensor([0, 1, 1])
    out = get_method(name).loss(ctx, x, y)
    assert [e[0] for e in log] == ["PGD"] * 3 and all(e[1] is ctx.net for e in log)
    for (_, _, kw, xin, yin), norm, eps, alpha in zip(log, cfg.norms, (4.0, 1.0, 0.2), (0.5, 0.25, 0.05)):
        assert kw == dict(norm=norm, eps=eps, alpha=alpha, steps=3, k=5, random_start=True)
        assert xin is x and yin is y
    (seen,) = ctx.train_net.inputs
    torch.testing.assert_close(seen, torch.cat([x + 0.01, x + 0.02, x + 0.03]))
    # the shifts move both pixels alike, so the logit gaps and CEs are those of x:
    # CE([a, b], y) = log(e^a + e^b) - (a if y == 0 else b)
    ce = [math.log(math.e + 1) - 1, math.log(math.exp(0.5) + math.exp(0.49)) - 0.49, math.log(1 + math.e) - 1]
    want = sum(ce) / 3  # the same for each attack, so the mean of 9 and the mean of maxima agree
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert (out.correct, out.seen) == (2, 3)  # example 1 (0.5 > 0.49, y = 1) is wrong


def test_multi_perturbation_reductions_differ_on_per_attack_losses():
    losses = torch.tensor([[1.0, 4.0], [3.0, 2.0], [0.0, 0.0]])  # [M attacks, B examples]
    assert get_method("avg").reduce(losses).item() == pytest.approx(10 / 6)
    assert get_method("max").reduce(losses).item() == pytest.approx((3 + 4) / 2)


def test_multi_perturbation_accuracy_needs_every_attack(monkeypatch):
    _record(monkeypatch)

    class Flip(PixelLogits):  # the third attack's batch (shift 0.03) flips every prediction
        def forward(self, x):
            out = super().forward(x)
            third = (x.flatten(1)[:, 0] - x.flatten(1)[:, 0].round(decimals=1)).abs() > 0.025
            return torch.where(third[:, None], out.flip(1), out)

    net = Flip()
    ctx = StepContext(net, net, _cfg(), torch.Generator())
    x = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]], [[[0.0, 0.0, 1.0, 0.0]]]])
    out = get_method("avg").loss(ctx, x, torch.tensor([0, 2]))
    assert (out.correct, out.seen) == (0, 2)  # right under two attacks, wrong under the third


# -- the adversaries' arguments -------------------------------------------------------------------

def test_at_attacks_its_one_norm_and_trains_on_the_result(monkeypatch):
    log, _ = _record(monkeypatch)
    cfg = _cfg(norms=("l2",), eps=(2.0,), alpha=(0.5,))
    ctx = _ctx(cfg)
    x, y = _xy()
    out = get_method("at").loss(ctx, x, y)
    ((name, model, kw, xin, yin),) = log
    assert name == "PGD" and model is ctx.net and xin is x and yin is y
    assert kw == dict(norm="l2", eps=1.0, alpha=0.25, steps=3, k=5, random_start=True)
    (seen,) = ctx.train_net.inputs
    torch.testing.assert_close(seen, x + 0.01)
    assert out.loss.item() == pytest.approx(F.cross_entropy((x + 0.01).flatten(1)[:, :K], y).item(), rel=1e-6)


@pytest.mark.parametrize("k_range, want", [((), None), ((5, 20), (5, 20))])
def test_msd_asks_for_its_rule_and_k_range(k_range, want, monkeypatch):
    log, _ = _record(monkeypatch)
    cfg = _cfg(k_range=k_range)
    ctx = _ctx(cfg)
    x, y = _xy()
    get_method("msd").loss(ctx, x, y)
    ((name, model, kw, xin, yin),) = log
    assert name == "MSD" and model is ctx.net and xin is x and yin is y
    assert kw == dict(norms=cfg.norms, eps=(4.0, 1.0, 0.2), alpha=(0.5, 0.25, 0.05), steps=3, k=5,
                      select="batch", k_range=want)
    torch.testing.assert_close(ctx.train_net.inputs[0], x + 0.01)


def test_ensemble_at_repeats_the_batch_per_member(monkeypatch):
    log, _ = _record(monkeypatch)
    cfg = _cfg()
    ctx = _ctx(cfg)
    x, y = _xy(b=2, c=3)  # C = M = 3: a wrongly placed member axis would still broadcast
    get_method("ensemble_at").loss(ctx, x, y)
    ((name, model, kw, xin, yin),) = log
    assert name == "mimo_pgd" and model is ctx.net
    assert kw == dict(norms=cfg.norms, eps=(4.0, 1.0, 0.2), alpha=(0.5, 0.25, 0.05), steps=3, k=5,
                      gradient="approx", random_start=True)
    for m in range(3):
        assert torch.equal(xin[:, m], x) and torch.equal(yin[:, m], y)
    assert xin.is_contiguous() and yin.is_contiguous()
    torch.testing.assert_close(ctx.train_net.inputs[0], xin + 0.01)


@pytest.mark.parametrize("name, gradient", [("mat", "approx"), ("mimo_at", "naive"), ("mat_same", "approx")])
@pytest.mark.parametrize("outer", ["sum", "max"])
def test_mimo_adversarial_methods_ask_for_their_gradient(name, gradient, outer, monkeypatch):
    log, batches = _record(monkeypatch)
    cfg = _cfg(outer=outer)
    ctx = _ctx(cfg)
    x, y = _xy(b=2)
    out = get_method(name).loss(ctx, x, y)
    assert batches == [(3, dict(generator=ctx.generator, repetition=0.25))]
    ((fn, model, kw, xin, yin),) = log
    assert fn == "mimo_pgd" and model is ctx.net
    assert kw == dict(norms=cfg.norms, eps=(4.0, 1.0, 0.2), alpha=(0.5, 0.25, 0.05), steps=3, k=5,
                      gradient=gradient, random_start=True)
    assert torch.equal(xin[:, 1], x.roll(1, 0)) and torch.equal(yin[:, 2], y.roll(2, 0))
    (seen,) = ctx.train_net.inputs
    torch.testing.assert_close(seen, xin + 0.01)
    per = torch.stack([F.cross_entropy(seen[:, m].flatten(1)[:, :K], yin[:, m]) for m in range(3)])
    want = per.sum() if outer == "sum" else per.max()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6) and out.seen == 6


@pytest.mark.parametrize("k_range, want", [((), None), ((5, 20), (5, 20))])
def test_mat_msd_asks_for_msd_on_every_member(k_range, want, monkeypatch):
    log, batches = _record(monkeypatch)
    cfg = _cfg(k_range=k_range, outer="max")
    ctx = _ctx(cfg)
    x, y = _xy(b=2)
    out = get_method("mat_msd").loss(ctx, x, y)
    assert batches == [(3, dict(generator=ctx.generator, repetition=0.25))]
    ((fn, model, kw, xin, yin),) = log
    assert fn == "mimo_msd" and model is ctx.net
    assert kw == dict(norms=cfg.norms, eps=(4.0, 1.0, 0.2), alpha=(0.5, 0.25, 0.05), steps=3, k=5,
                      select="batch", random_start=True, k_range=want)
    seen = ctx.train_net.inputs[0]
    per = torch.stack([F.cross_entropy(seen[:, m].flatten(1)[:, :K], yin[:, m]) for m in range(3)])
    assert out.loss.item() == pytest.approx(per.max().item(), rel=1e-6)


def test_mimo_trains_on_its_shuffles(monkeypatch):
    log, batches = _record(monkeypatch)
    cfg = _cfg()
    ctx = _ctx(cfg)
    x, y = _xy(b=2)
    out = get_method("mimo").loss(ctx, x, y)
    assert not log and batches == [(3, dict(generator=ctx.generator, repetition=0.25))]
    (seen,) = ctx.train_net.inputs
    assert torch.equal(seen[:, 2], x.roll(2, 0))
    per = [F.cross_entropy(seen[:, m].flatten(1)[:, :K], y.roll(m, 0)) for m in range(3)]
    assert out.loss.item() == pytest.approx(sum(p.item() for p in per), rel=1e-6)


def test_attacks_run_in_eval_mode_and_the_mode_is_restored():
    cfg = _cfg(norms=("linf",), eps=(0.1,), alpha=(0.05,), steps=2, random_start=False)
    net = PixelLogits()
    x, y = _xy()
    for start in (True, False):
        net.train(start)
        net.modes.clear()
        get_method("at").loss(StepContext(net, net, cfg, torch.Generator()), x, y)
        assert net.modes == [False, False, start]  # two attack steps in eval, then the training forward
        assert net.training is start


# -- registry, norms, members, networks, description ----------------------------------------------

def test_register_and_get_method(monkeypatch):
    from pyens.training import method_base

    monkeypatch.setattr(method_base, "METHODS", {})

    class Dummy(M.Method):
        name = "dummy"

    assert M.register(Dummy) is Dummy and isinstance(method_base.METHODS["dummy"], Dummy)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"method must be one of \[.*'mat'.*\], got 'matt' \(did you mean 'mat'\?\)"):
        get_method("matt")
    with pytest.raises(ValueError, match=r"got 'zzzz'$"):
        get_method("zzzz")
    assert get_method("mat") is METHODS["mat"]
    base = M.Method()
    with pytest.raises(NotImplementedError):
        base.passes(1, 1)
    with pytest.raises(NotImplementedError):
        base.loss(None, None, None)


def test_member_norms_and_counts():
    three = ("l1", "l2", "linf")
    assert get_method("standard").member_norms((), 3) == three
    assert get_method("mat").member_norms(("l2", "linf"), 3) == ("l2", "linf")
    assert get_method("standard").members(three, 5) == 1
    assert get_method("avg").members(three, 5) == 3 and get_method("msd").members(("l1", "l2"), 5) == 2
    assert get_method("mat").members(three, 5) == 3 and get_method("ensemble_at").members(("l1", "l2"), 5) == 2
    assert get_method("mimo").members(three, 5) == 5
    assert get_method("at").member_norms((), 3) == ("linf",)
    assert get_method("at").member_norms(("l2",), 3) == ("l2",)
    with pytest.raises(ValueError, match=r"norms: method 'at' trains against one norm, got \('l1', 'l2'\)"):
        get_method("at").member_norms(("l1", "l2"), 3)
    assert get_method("mat_same").member_norms((), 3) == ("linf",) * 3
    assert get_method("mat_same").member_norms(("l2", "l2"), 4) == ("l2",) * 4
    with pytest.raises(ValueError, match=r"norms: method 'mat_same' trains every member on one norm, got"):
        get_method("mat_same").member_norms(("l1", "l2"), 2)
    for name in ("dml", "dml_at", "ensemble"):
        assert get_method(name).member_norms((), 4) == ("linf",) * 4
        assert get_method(name).member_norms(("linf", "linf"), 3) == ("linf",) * 3
        assert get_method(name).members(three, 4) == 4
        with pytest.raises(ValueError, match=rf"norms: method '{name}' uses linf only \(FGSM\); got \('l2',\)"):
            get_method(name).member_norms(("l2",), 2)


@pytest.mark.parametrize("name, kind", [("standard", "single"), ("mat", "mimo"), ("ensemble_at", "ensemble")])
def test_build_makes_the_methods_network_for_the_data(name, kind):
    data = SimpleNamespace(image_shape=(3, 8, 8), num_classes=4, mean=(0.5, 0.25, 0.0), std=(2.0, 4.0, 1.0))
    cfg = SimpleNamespace(model=lambda c, k: nn.Sequential(nn.Flatten(), nn.Linear(c * 64, k)), members=2)
    net = get_method(name).build(cfg, data)
    x = torch.rand(2, 3, 8, 8)
    if kind == "single":
        assert net(x).shape == (2, 4) and net.in_channels == 3 and net.num_classes == 4
        norm = net.normalize
    else:
        assert net.members == 2 and net.num_classes == 4 and net.member_logits(x).shape == (2, 2, 4)
        norm = net.normalize if kind == "mimo" else net.models[0].normalize
    got = norm(torch.full((1, 3, 1, 1), 1.0)).flatten().tolist()
    assert got == pytest.approx([(1 - 0.5) / 2, (1 - 0.25) / 4, 1.0])  # (x - mean) / std per channel


def test_describe_says_method_network_and_adversary():
    from pyens.training import TrainConfig

    cfg = TrainConfig(method="mat_msd", members=3, msd_select="batch", input_repetition=0.5, epochs=7,
                      steps=4).resolved()
    assert describe(cfg) == (f"mat_msd: {METHODS['mat_msd'].doc}; 3 members; MSD rule batch (per member over the "
                             f"batch, last step (the MAT authors' code)); input repetition 0.5; backbone "
                             f"small_cnn, 7 epochs, K = 4")
    cfg = TrainConfig(method="msd", epochs=2, steps=3).resolved()
    assert describe(cfg) == (f"msd: {METHODS['msd'].doc}; MSD rule example (per example, best step (Maini et al.)); "
                             f"backbone small_cnn, 2 epochs, K = 3")
    cfg = TrainConfig(method="mat", epochs=1, steps=2).resolved()
    assert describe(cfg) == f"mat: {METHODS['mat'].doc}; 3 members; backbone small_cnn, 1 epochs, K = 2"
    assert describe(TrainConfig(method="standard", epochs=1, steps=2).resolved()) == (
        f"standard: {METHODS['standard'].doc}; backbone small_cnn, 1 epochs, K = 2")


# -- DML methods ----------------------------------------------------------------------------------

def test_dml_at_takes_each_members_fgsm_step(monkeypatch):
    log, _ = _record(monkeypatch)

    class Penalised(PixelLogits):
        def penalty(self, gamma, beta):
            return torch.tensor(10.0 * gamma + 100.0 * beta)

    net, train = Penalised(2), Penalised(2)
    cfg = _cfg(members=2, eps=(0.4,), extra={"gamma": 0.5, "beta": 0.25})
    ctx = StepContext(net, train, cfg, torch.Generator(), progress=0.25)  # warm-up: eps 0.4 -> 0.2
    x, y = _xy(b=2)
    out = get_method("dml_at").loss(ctx, x, y)
    ((fn, model, kw, xin, yin),) = log
    assert fn == "mimo_pgd" and model is net
    assert kw == dict(norms="linf", eps=0.2, alpha=0.2, steps=1, random_start=False)
    assert xin.is_contiguous() and yin.is_contiguous()
    assert torch.equal(xin[:, 0], x) and torch.equal(xin[:, 1], x) and torch.equal(yin[:, 1], y)
    (seen,) = train.inputs
    torch.testing.assert_close(seen, xin + 0.01)
    ce = F.cross_entropy((x + 0.01).flatten(1)[:, :K], y).item()
    assert out.loss.item() == pytest.approx(2 * ce + 0.5 * 10 + 0.25 * 100, rel=1e-6)  # eq. 3
    assert out.seen == 4


def test_dml_settings_parse_and_reject():
    s = DMLSettings.from_config(SimpleNamespace(extra={"gamma": 0, "beta": 2, "trainable": "all", "fixed": "none"}))
    assert (s.gamma, s.beta, s.trainable, s.fixed, s.variant) == (0, 2, "all", "none", "dml")
    assert DMLSettings.from_config(SimpleNamespace()) == DMLSettings()
    assert DMLSettings.from_config(SimpleNamespace(extra=None)) == DMLSettings()
    for ok in ({"trainable": -1}, {"trainable": 0}, {"trainable": "none"}, {"fixed": 0.5}, {"fixed": 1},
               {"variant": "rdml"}, {"variant": "aug"}, {"sigma": 0.0}, {"layout_seed": -1}):
        DMLSettings.from_config(SimpleNamespace(extra=ok))
    bad = [
        ({"gama": 1}, r"extra: unknown DML settings \['gama'\]; known: \['beta', "),
        ({"gamma": True}, r"extra.gamma must be a finite number >= 0; got True"),
        ({"beta": "1"}, r"extra.beta must be a finite number >= 0; got '1'"),
        ({"sigma": float("inf")}, r"extra.sigma must be a finite number >= 0; got inf"),
        ({"gamma": -0.1}, r"extra.gamma must be a finite number >= 0; got -0.1"),
        ({"variant": "DML"}, r"extra.variant must be one of \('dml', 'rdml', 'aug'\), got 'DML'"),
        ({"trainable": -2}, r"extra.trainable must be -1 \(K // members\), an int >= 0, 'all' or 'none'; got -2"),
        ({"trainable": True}, "extra.trainable must be"),
        ({"trainable": 2.0}, "extra.trainable must be"),
        ({"trainable": "some"}, "extra.trainable must be"),
        ({"fixed": True}, r"extra.fixed must be a number > 0 or 'none'; got True"),
        ({"fixed": "0.1"}, r"extra.fixed must be a number > 0 or 'none'; got '0.1'"),
        ({"embedding": True}, r"extra.embedding must be an int; got True"),
        ({"samples": 2.0}, r"extra.samples must be an int; got 2.0"),
        ({"layout_seed": "1"}, r"extra.layout_seed must be an int; got '1'"),
    ]
    for extra, match in bad:
        with pytest.raises(ValueError, match=match):
            DMLSettings.from_config(SimpleNamespace(extra=extra))


def test_dml_settings_build_the_network_they_describe():
    data = SimpleNamespace(image_shape=(1, 1, 12), num_classes=4, mean=(0.5,), std=(2.0,))
    cfg = SimpleNamespace(members=2, model=lambda c, n: nn.Flatten(), seed=7)
    net = DMLSettings(init=0.5, fixed="none", trainable=1, variant="rdml", sigma=0.3, samples=4,
                      form="tril", train_centers=True, embedding=12).network(cfg, data)
    assert net.members == 2 and net.num_classes == 4 and net.embedding == 12
    assert [len(s) for s in net.index_sets] == [1, 1]
    for d in net.dmls:
        assert d.form == "tril" and d.randomized and not d.augment and (d.sigma, d.samples) == (0.3, 4)
        assert isinstance(d.centers, nn.Parameter)
        assert torch.allclose(d.metric().diagonal(), torch.full((12,), 0.5))  # fixed "none" keeps init
    # seed: the run's seed unless layout_seed is set; the shuffles follow it
    perms = [d.permutation.tolist() for d in net.dmls]
    layout = dict(embedding=12, trainable=1, init=0.5)  # what the shuffles depend on
    same = DMLSettings(**layout).network(cfg, data)
    assert [d.permutation.tolist() for d in same.dmls] == perms
    other = DMLSettings(**layout, layout_seed=8).network(cfg, data)
    assert [d.permutation.tolist() for d in other.dmls] != perms
    assert [d.permutation.tolist() for d in
            DMLSettings(**layout, layout_seed=7).network(SimpleNamespace(**{**vars(cfg), "seed": 1}),
                                                             data).dmls] == perms
    zero = [[d.permutation.tolist() for d in DMLSettings(**layout, layout_seed=0).network(
        SimpleNamespace(**{**vars(cfg), "seed": seed}), data).dmls] for seed in (1, 2)]
    assert zero[0] == zero[1]  # layout_seed 0 is a seed, not "use the run's"
    # defaults: embedding K, K // members trainable entries frozen at 0.1, plain DML; aug variant
    d0 = DMLSettings().network(SimpleNamespace(**{**vars(cfg), "model": lambda c, n: nn.Flatten()}),
                               SimpleNamespace(**{**vars(data), "image_shape": (1, 1, 4)}))
    assert d0.embedding == 4 and [len(s) for s in d0.index_sets] == [2, 2]
    for d, s in zip(d0.dmls, d0.index_sets):
        frozen = [j for j in range(4) if j not in s]
        assert torch.allclose(d.metric().diagonal()[frozen], torch.full((2,), 0.1))
        assert d.variant == "dml" and not isinstance(d.centers, nn.Parameter) and d.form == "diag"
    aug = DMLSettings(variant="aug", embedding=12).network(cfg, data)
    assert all(d.augment and not d.randomized for d in aug.dmls)
    x = torch.full((1, 1, 1, 12), 1.0)
    assert torch.allclose(net.embeddings(x), torch.full((1, 2, 12), 0.25))  # (1 - 0.5) / 2: mean, std passed
    rgb = SimpleNamespace(image_shape=(3, 1, 4), num_classes=4, mean=(0.0,) * 3, std=(1.0,) * 3)
    line = DMLSettings(centers="1d", trainable="all").network(cfg, rgb)  # A.5: classes on a line
    assert line.in_channels == 3 and line.models[0].in_channels == 3 and line.embedding == 1
    assert all(d.centers.shape == (4, 1) for d in line.dmls)


def test_method_families_do_not_import_each_other():
    """Issue 21: the MAT-paper and DML-paper methods share method_base, not each other, and the
    registry holds both families whichever module is imported first."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import pyens.training as T

    for name, other in (("methods", "dml_methods"), ("dml_methods", "methods")):
        tree = ast.parse(Path(T.__file__).with_name(f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert f"pyens.training.{other}" not in imported and other not in imported, name
    for first in ("pyens.training.dml_methods", "pyens.training.methods", "pyens.training.method_base"):
        out = subprocess.run([sys.executable, "-c", f"import {first}; from pyens.training.method_base import METHODS; "
                              "print(' '.join(sorted(METHODS)))"], capture_output=True, text=True, check=True)
        assert {"dml", "dml_at", "ensemble", "mat", "mat_msd", "standard"} <= set(out.stdout.split()), first
