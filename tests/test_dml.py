"""DML ensembles: layout, eq. 3 terms, consensus, detection, smoothing, training methods, evaluation."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import pyens
from pyens.ensembles import (
    ConsensusClassifier,
    DMLEnsemble,
    UncertaintyDetector,
    agreement,
    certified_accuracy,
    certify,
    consensus,
    detect,
    dml_layout,
    lower_confidence_bound,
    resolve_nu,
    roc,
    uncertainty,
    votes,
)

TINY = dict(dataset="mnist", model="lenet", train_size=40, batch_size=20, epochs=1, eval_size=20, progress=False)


def _net(members=5, **kw):
    torch.manual_seed(0)
    return DMLEnsemble(members, "lenet", **kw).eval()


# -- the ensemble -----------------------------------------------------------------------------------

def test_member_interface_and_shapes():
    net = _net(3)
    x = torch.rand(4, 1, 28, 28)
    z = net.member_logits(x)
    assert z.shape == (4, 3, 10) and (z <= 0).all()  # logits are negative distances
    assert torch.equal(net(x.unsqueeze(1).expand(-1, 3, -1, -1, -1)), z)
    assert torch.equal(net.member(1)(x), z[:, 1])
    assert torch.equal(net.ensemble(x), z.sum(1))  # the attack surrogate (A.3)
    assert torch.equal(net.ensemble(x, average="vote").argmax(1), consensus(z, "vote").argmax(1))
    assert net.embeddings(x).shape == (4, 3, 10) and net.num_classes == 10 and net.members == 3
    with pytest.raises(ValueError, match="average must be one of"):
        net.ensemble(x, average="max")


def test_layout_is_the_papers():
    net = _net(5)
    sets = net.index_sets
    assert all(len(s) == 2 for s in sets) and len({a for s in sets for a in s}) == 10  # disjoint I_k
    own = net.own_classes
    assert own.sum(1).tolist() == [2] * 5 and own.sum(0).tolist() == [1] * 10  # disjoint own labels
    for d, s, o in zip(net.dmls, sets, own):
        assert d.mask.nonzero().flatten().tolist() == s
        assert sorted(d.permutation[o].tolist()) == s  # own labels' centers sit on the trainable axes
        m = d.metric().diagonal()
        frozen = torch.ones(10, dtype=torch.bool)
        frozen[s] = False
        assert torch.allclose(m[frozen], torch.full((8,), 0.1)) and isinstance(d.centers, torch.Tensor)
        assert not isinstance(d.centers, torch.nn.Parameter)
    perms = torch.stack([d.permutation for d in net.dmls])
    assert len({tuple(p.tolist()) for p in perms}) == 5  # centers shuffled per member


def test_layout_function_and_variants():
    layout = dml_layout(3, 10, 12, 3, torch.Generator().manual_seed(1))
    axes = [a for _, s in layout for a in s]
    assert len(axes) == len(set(axes)) == 9
    for perm, s in layout:
        assert perm.unique().numel() == 10 and perm.max() < 12
    with pytest.raises(ValueError, match="exceed the 10 classes"):
        dml_layout(5, 10, 10, 3)
    line = _net(2, centers="1d", trainable="all")
    assert line.embedding == 1 and line.member_logits(torch.rand(2, 1, 28, 28)).shape == (2, 2, 10)
    assert not line.own_classes.any()
    with pytest.raises(ValueError, match="with centers='1d' M is 1x1"):
        DMLEnsemble(2, "lenet", centers="1d")
    free = _net(2, trainable="all", fixed=None)
    assert all(bool(d.mask.all()) for d in free.dmls)
    assert _net(2, trainable=0).own_classes.sum() == 0


def test_orthogonality_and_l1_by_hand():
    net = _net(2, trainable=2)
    a, b = net.dmls
    with torch.no_grad():
        a.weight.copy_(torch.arange(1.0, 11.0))
        b.weight.copy_(torch.arange(1.0, 11.0).flip(0))
    ma, mb = a.metric().diagonal(), b.metric().diagonal()
    # ||M_a M_b||_F for diagonal M is the 2-norm of the entry products; eq. 3 sums both orders.
    want_orth = 2 * (ma * mb).norm()
    want_l1 = ma[net.index_sets[0]].sum() + mb[net.index_sets[1]].sum()
    assert net.orthogonality().item() == pytest.approx(want_orth.item(), rel=1e-6)
    assert net.l1().item() == pytest.approx(want_l1.item(), rel=1e-6)
    assert net.penalty(0.5, 2.0).item() == pytest.approx(0.5 * want_orth.item() + 2 * want_l1.item(), rel=1e-6)
    full = DMLEnsemble(2, "lenet", form="full", trainable="all")
    m = full.metrics()
    want = torch.linalg.matrix_norm(m[0] @ m[1]) + torch.linalg.matrix_norm(m[1] @ m[0])
    assert full.orthogonality().item() == pytest.approx(want.item(), rel=1e-5)


def test_penalty_gradient_reaches_only_trainable_entries():
    net = _net(3)
    net.penalty(0.01, 0.01).backward()
    for d in net.dmls:
        assert bool((d.weight.grad[~d.mask] == 0).all()) and bool((d.weight.grad[d.mask] != 0).all())


# -- consensus ----------------------------------------------------------------------------------------

def _z(top: list[list[int]], k: int = 4) -> torch.Tensor:
    """Member logits whose top-1 per (example, member) is ``top``; logit 1 there, 0 elsewhere."""
    t = torch.tensor(top)
    return torch.nn.functional.one_hot(t, k).float()


def test_vote_meta_and_averages_on_constructed_votes():
    z = _z([[0, 0, 1], [2, 1, 3], [1, 1, 1]])
    assert votes(z).tolist() == [[2, 1, 0, 0], [0, 1, 1, 1], [0, 3, 0, 0]]
    assert consensus(z, "vote").argmax(1).tolist()[0::2] == [0, 1]
    z_tie = z.clone()
    z_tie[1, 2, 3] = 1.5  # class 3 has the largest summed logit among the tied ones
    assert consensus(z_tie, "vote").argmax(1)[1].item() == 3
    own = torch.zeros(3, 4, dtype=torch.bool)
    own[0, 0] = own[1, 0] = True  # members 0 and 1 ignore their votes for class 0
    assert votes(z, own)[0].tolist() == [0, 1, 0, 0]
    assert consensus(z, "meta", own=own).argmax(1)[0].item() == 1
    # one-hot top-1 logits: the sum is the vote count, the median of 3 the class at least 2 members chose
    assert consensus(z, "sum").tolist() == [[2, 1, 0, 0], [0, 1, 1, 1], [0, 3, 0, 0]]
    torch.testing.assert_close(consensus(z, "mean"), torch.tensor([[2, 1, 0, 0], [0, 1, 1, 1], [0, 3, 0, 0]]) / 3)
    assert consensus(z, "median").tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    assert torch.allclose(consensus(z, "prob").exp().sum(1), torch.ones(3))
    assert torch.allclose(consensus(10 * z, "soft_vote", tau=0.01), votes(z))  # the relaxation's limit
    with pytest.raises(ValueError, match="rule 'meta' needs own"):
        consensus(z, "meta")
    with pytest.raises(ValueError, match="rule must be one of"):
        consensus(z, "max")
    with pytest.raises(ValueError, match=r"z must be member logits \[B, M, K\]"):
        consensus(z[0], "vote")
    with pytest.raises(ValueError, match=r"own must be \[M, K\]"):
        votes(z, own[:2])


def test_consensus_classifier_value_is_the_vote_gradient_is_the_sum():
    net = _net(3)
    clf = ConsensusClassifier(net, "vote")
    x = torch.rand(6, 1, 28, 28, requires_grad=True)
    out = clf(x)
    assert torch.equal(out.detach(), consensus(net.member_logits(x), "vote"))
    (g,) = torch.autograd.grad(out[:, 2].sum(), x)
    (g_sum,) = torch.autograd.grad(net.ensemble(x)[:, 2].sum(), x)
    assert torch.equal(g, g_sum)
    meta = ConsensusClassifier(net, "meta")
    assert meta(x).shape == (6, 10)
    with pytest.raises(ValueError, match="rule 'meta' needs a net with own_classes"):
        ConsensusClassifier(pyens.nn.build_ensemble("lenet", members=2, in_channels=1, num_classes=10,
                                                    mean=(0.0,), std=(1.0,)), "meta")
    with pytest.raises(ValueError, match="surrogate must be a differentiable rule"):
        ConsensusClassifier(net, "vote", surrogate="vote")


# -- detection ------------------------------------------------------------------------------------------

def test_detection_thresholds():
    z = _z([[0, 0, 0, 0, 0], [0, 0, 0, 1, 2], [0, 1, 2, 3, 3]], k=5)
    assert agreement(z).tolist() == [5, 3, 2]
    assert detect(z, nu="majority").tolist() == [False, False, True]
    assert detect(z, nu="unanimity").tolist() == [False, True, True]
    assert detect(z, nu=2).tolist() == [False, False, False]
    assert resolve_nu("majority", 4) == 3 and resolve_nu("unanimity", 4) == 4
    for bad in (0, 6, "most", 2.5):
        with pytest.raises(ValueError, match="nu must be"):
            resolve_nu(bad, 5)
    net = _net(3)
    flagged = net.detect(torch.rand(4, 1, 28, 28), nu="unanimity")
    assert flagged.dtype == torch.bool and flagged.shape == (4,)


def test_roc_and_uncertainty_detector():
    r = roc(torch.tensor([0.0, 0.1, 0.2]), torch.tensor([0.5, 0.9]))
    assert r["auc"] == 1.0 and r["fpr"][0] == 0.0 and r["tpr"][-1] == 1.0
    assert roc(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))["auc"] == 0.5
    with pytest.raises(ValueError, match="roc needs benign and adversarial scores"):
        roc(torch.tensor([]), torch.tensor([1.0]))
    g = torch.Generator().manual_seed(0)
    neg = torch.rand(40, 3, generator=g) * 1e-3
    pos = torch.rand(40, 3, generator=g) * 1e-3 + 1e-2
    det = UncertaintyDetector().fit(neg[:20], pos[:20])
    assert det.evaluate(neg[20:], pos[20:])["auc"] == 1.0


def test_uncertainty_features():
    net = _net(3)
    x = torch.rand(4, 1, 28, 28)
    f = uncertainty(net, x, draws=3, sigma=0.2)
    assert f.shape == (4, 3) and (f >= 0).all() and (f[:, 1] > 0).all()
    assert torch.equal(f, uncertainty(net, x, draws=3, sigma=0.2))  # seeded draws
    assert torch.allclose(uncertainty(net, x, draws=3, sigma=0.0)[:, 1], torch.zeros(4), atol=1e-10)
    assert all(d.variant == "dml" for d in net.dmls)  # the layers are restored
    plain = pyens.nn.build_ensemble("lenet", members=2, in_channels=1, num_classes=10, mean=(0.0,), std=(1.0,))
    assert uncertainty(plain, x)[:, 1].eq(0).all()


# -- smoothing -----------------------------------------------------------------------------------------

class _Constant(torch.nn.Module):
    def __init__(self, label, k=3):
        super().__init__()
        self.label, self.num_classes = label, k

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((len(x),), self.label), self.num_classes).float()


class _Coin(torch.nn.Module):
    num_classes = 2

    def forward(self, x):
        return torch.stack([x.flatten(1)[:, 0], -x.flatten(1)[:, 0]], 1)  # sign of noisy pixel 0


def test_certify_constant_and_coin():
    from scipy.stats import norm

    x = torch.zeros(2, 1, 2, 2)
    pred, radius = certify(_Constant(1), x, sigma=0.5, n0=10, n=100, alpha=0.001)
    bound = lower_confidence_bound(100, 100, 0.001)
    assert bound == pytest.approx(0.001 ** (1 / 100))
    assert pred.tolist() == [1, 1] and radius[0].item() == pytest.approx(0.5 * norm.ppf(bound))
    pred, radius = certify(_Coin(), x, sigma=1.0, n0=10, n=200, generator=torch.Generator().manual_seed(0))
    assert pred.tolist() == [-1, -1] and radius.tolist() == [0.0, 0.0]  # a fair coin is never certified
    acc = certified_accuracy(torch.tensor([1, 1, -1]), torch.tensor([0.3, 0.8, 0.0]), torch.tensor([1, 0, 1]),
                             [0.0, 0.5])
    assert acc == {0.0: pytest.approx(1 / 3), 0.5: 0.0}
    with pytest.raises(ValueError, match="sigma must be > 0"):
        certify(_Constant(0), x, sigma=0)


# -- training methods -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, extra", [
    ("dml", {}),
    ("dml_at", {}),
    ("ensemble", {}),
    ("dml", {"variant": "rdml", "samples": 2, "form": "tril", "trainable": "all"}),
    ("dml", {"variant": "aug", "samples": 2, "centers": "1d", "trainable": "all"}),
])
def test_methods_train_a_few_steps(method, extra, tmp_path):
    result = pyens.train(method, out=str(tmp_path / method), members=3, max_steps=2, extra=extra, **TINY)
    assert result.checkpoint.exists()
    run = pyens.load_run(tmp_path / method)
    scores = run.classifier(torch.rand(2, 1, 28, 28))
    assert scores.shape == (2, 10) and torch.isfinite(scores).all()
    if method != "ensemble":
        assert isinstance(run.net, DMLEnsemble) and run.net.members == 3


def test_dml_loss_is_eq3():
    from pyens.training import TrainConfig, build_network
    from pyens.training.methods import StepContext, get_method

    cfg = TrainConfig(method="dml", model="lenet", members=2, extra={"gamma": 0.5, "beta": 0.25}).resolved()
    data = SimpleNamespace(image_shape=(1, 28, 28), num_classes=10, mean=(0.1307,), std=(0.3081,))
    torch.manual_seed(0)
    net = build_network(cfg, data)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    out = get_method("dml").loss(StepContext(net, net, cfg, torch.Generator()), x, y)
    z = net.member_logits(x)
    ce = sum(torch.nn.functional.cross_entropy(z[:, m], y) for m in range(2))
    want = ce + 0.5 * net.orthogonality() + 0.25 * net.l1()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5) and out.seen == 8


@pytest.mark.parametrize("extra, match", [
    ({"gama": 0.1}, r"extra: unknown DML settings \['gama'\]"),
    ({"gamma": -1.0}, "extra.gamma must be a finite number >= 0"),
    ({"variant": "noisy"}, "extra.variant must be one of"),
    ({"trainable": -3}, "extra.trainable must be"),
    ({"fixed": "zero"}, "extra.fixed must be a number > 0 or 'none'"),
    ({"samples": 1.5}, "extra.samples must be an int"),
    ({"trainable": 3}, "trainable: 5 members x 3 entries exceed the 10 classes"),
])
def test_bad_dml_settings(extra, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        pyens.train("dml", out=str(tmp_path / "r"), members=5, max_steps=1, extra=extra, **TINY)


def test_dml_norms_are_linf_only():
    from pyens.training import TrainConfig

    assert TrainConfig(method="dml_at", members=4).resolved().norms == ("linf",) * 4
    with pytest.raises(ValueError, match="norms: method 'dml_at' uses linf only"):
        TrainConfig(method="dml_at", norms=("l2",)).resolved()


def test_shipped_dml_configs():
    from pyens.training import load_config

    for name in ("quick-mnist-dml", "mnist-dml-paper", "cifar10-dml-paper", "resisc45-dml-paper"):
        cfg = load_config(name).resolved()
        assert cfg.method == "dml" and cfg.members == 5 and cfg.extra["gamma"] == cfg.extra["beta"] == 0.01
    assert load_config("mnist-dml-paper").model == "lenet"
    assert load_config("resisc45-dml-paper").dataset == "resisc45"


# -- evaluation -----------------------------------------------------------------------------------------

def test_eval_tables_run_on_a_tiny_ensemble():
    from pyens.eval import dml as E

    net = _net(2)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    t4 = E.transfer_table(net, x, y, eps=0.1, steps=2)
    assert t4["columns"] == ["Ensemble", "Model 1", "Model 2"]
    assert all(0 <= v <= 1 for row in t4["rows"].values() for v in row)
    t5 = E.cw_distortion(net, x[:3], y[:3], steps=3)
    assert set(t5["columns"]) == {"Ensemble kappa=0", "Ensemble kappa=0.1", "Model 1", "Model 2"}
    rep = E.table2({"dml": net}, (x, y), n=6, cw_steps=2, progress=False)[0]
    assert [a.name for a in rep.attacks][:2] == ["FGSM (eps 0.2)", "FGSM (eps 0.3)"]
    with pytest.raises(ValueError, match="detection needs at least 4 inputs"):
        E.detection(net, x[:3], y[:3], eps=0.3, draws=2)
    voted = E.vote_classifier(net)(x).argmax(1)  # labels the untrained vote gets right
    det = E.detection(net, x, voted, eps=0.3, draws=2)
    assert set(det["attacks"]) == {"FGSM", "PGD-10"} and det["n"] == 6
    assert E.gradient_stats(net, x, y)["n"] == 6
    r = E.with_variant(net, "rdml", samples=2)
    assert all(d.randomized for d in r.dmls) and not any(d.randomized for d in net.dmls)


def test_masking_checks_read_the_signs():
    from pyens.eval.dml import masking_checks
    from pyens.eval.sanity import NO_MASKING_VERDICT, verdict

    eps = [0.0, 0.1, 0.3, 0.5]
    masked = {"eps": eps, "long": 100, "n": 100, "accuracy": {
        "FGSM": [0.99, 0.6, 0.4, 0.3], "BIM-10": [0.99, 0.95, 0.9, 0.9],
        "PGD-10": [0.99, 0.8, 0.7, 0.75], "PGD-long": [0.99, 0.7, 0.6, 0.6]}}
    checks = masking_checks(masked, gradients={"zero_grad": 0.2, "saturated": 0.3, "n": 100},
                            transfer_check={"source": "ensemble", "transfer": 0.5, "white_box": 0.7, "n": 100})
    assert [c.name for c in checks if c.passed is False] == [
        "accuracy falls towards 0 at the largest radius", "accuracy non-increasing in eps",
        "FGSM not stronger than PGD", "BIM (from the input) not much weaker than PGD (random start)",
        "more PGD steps gain little", "input gradients rarely exactly zero",
        "transfer from another model not stronger than white-box"]
    text = " ".join(c.detail + " ".join(c.violations) for c in checks if c.passed is False)
    for sign in ("does not fall towards 0", "PGD-10: 75.0% at eps 0.5 > 70.0%", "single step is stronger",
                 "far from converged", "only a random start", "zero input gradients", "transfer attack beats"):
        assert sign in text, sign
    clean = {"eps": eps, "long": 100, "n": 100, "accuracy": {a: [0.99, 0.5, 0.1, 0.0] for a in masked["accuracy"]}}
    assert verdict(masking_checks(clean)) == NO_MASKING_VERDICT


def test_positive_logits_fix_torchattacks_cw_on_distance_logits():
    import torchattacks

    from pyens.eval.dml import PositiveLogits

    class Centers(torch.nn.Module):  # logits -||x - c_k||: all negative, as a DML's
        def forward(self, x):
            c = torch.stack([torch.full((4,), 0.2), torch.full((4,), 0.8)])
            return -(x.flatten(1)[:, None] - c).norm(dim=-1)

    x, y = torch.full((3, 1, 2, 2), 0.3), torch.zeros(3, dtype=torch.long)
    raw = torchattacks.CW(Centers(), c=10.0, steps=50, lr=0.05)(x, y)
    assert torch.equal(raw, x)  # no classification gradient: CW returns the inputs
    fixed = torchattacks.CW(PositiveLogits(Centers()), c=10.0, steps=50, lr=0.05)(x, y)
    assert (Centers()(fixed).argmax(1) == 1).all()
    z = torch.randn(2, 5)
    shifted = PositiveLogits(torch.nn.Identity())(z)
    assert (shifted >= 1).all() and torch.allclose(shifted - shifted[:, :1], z - z[:, :1])


def test_render_markdown_and_plot(tmp_path):
    from pyens.eval import dml as E
    from pyens.eval.markdown import dml_markdown

    net = _net(2)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    report = E.dml_report({"dml": net}, (x, y), tables=("transfer", "curve"), n=4, progress=False,
                          budget={"curve_eps": (0.0, 0.2), "curve_long": 3}, log=lambda *_: None)
    md = dml_markdown(report)
    assert "Table 4 layout" in md and "Fig. 18" in md and "Honesty check" in md
    assert [c["name"] for c in report["honesty"]["dml"]] == [c.name for c in E.masking_checks()]
    from pyens.eval.plots import plot_dml_curves

    assert plot_dml_curves(report["curve"], tmp_path / "c.png").stat().st_size > 0
    with pytest.raises(ValueError, match="tables: unknown"):
        E.dml_report({"dml": net}, (x, y), tables=("table9",))
    assert not math.isnan(report["curve"]["dml"]["accuracy"]["FGSM"][0])
