"""The DML paper's evaluation tables (pyens.eval.dml) by value, on ensembles built so that the
answer is known (issue 17, item 5).

The ensemble: three members on images of three pixels; member m says class 1 iff pixel m
exceeds 0.5 (logits ``[0.5 - p_m, p_m - 0.5]``). Every member is increasing in its own pixel, so
the worst linf perturbation of radius eps moves every pixel by eps towards the wrong class;
FGSM, BIM, PGD and any differentiable surrogate of the vote reach that corner. An attack
crafted on one member moves only that member's pixel (the others have zero gradient and keep
their margins of at least 0.3). Expected accuracies below come from that closed form
(:func:`_corner`), never from the attacks.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from torch import nn

from pyens.eval import dml as E
from pyens.eval.markdown import dml_markdown
from pyens.nn import Ensemble
from tests.eval_helpers import one_thread  # noqa: F401 (autouse fixture)

PIXELS = [(0.55, 0.85, 0.15), (0.55, 0.85, 0.75), (0.9, 0.85, 0.15),
          (0.45, 0.15, 0.15), (0.45, 0.8, 0.15), (0.2, 0.8, 0.8)]
LABELS = [1, 1, 1, 0, 0, 0]
# member votes on the clean pixels: (1,1,0) (1,1,1) (1,1,0) (0,0,0) (0,1,0) (0,1,1): the vote misses
# the last example only; member 1 is always right, member 2 misses the last two, member 3 examples 0, 2, 5


class Pixel(nn.Module):
    """Class 1 iff pixel ``i`` > 0.5 (``sign=-1``: iff it is < 0.5)."""

    def __init__(self, i: int, sign: float = 1.0):
        super().__init__()
        self.i, self.sign = i, sign
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        d = self.sign * (x.flatten(1)[:, self.i] - 0.5) * self.w
        return torch.stack([-d, d], -1)


class Constant(nn.Module):
    """Always class ``c`` by a logit gap of 20, whatever the input (zero input gradient)."""

    def __init__(self, c: int):
        super().__init__()
        self.c = c
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        z = torch.zeros(len(x), 2)
        z[:, self.c] = 20.0
        return z + 0 * self.w * x.flatten(1)[:, :1]


def pixel_net(sign: float = 1.0) -> Ensemble:
    return Ensemble([Pixel(i, sign) for i in range(3)], num_classes=2).eval()


def constant_net(c: int = 1) -> Ensemble:
    return Ensemble([Constant(c) for _ in range(3)], num_classes=2).eval()


class FakeDML(Ensemble):
    """A DML stand-in: its "dml" variant is the pixel ensemble, "rdml" always says 0 and "aug"
    always says 1, so each row of a table shows which variant it ran."""

    dmls = ()

    def __init__(self):
        super().__init__([Pixel(i) for i in range(3)], num_classes=2)
        self.variant = "dml"

    def set_variant(self, variant, *, sigma=None, samples=None, seed=None):
        self.variant = variant
        if variant != "dml":
            self.models = nn.ModuleList([Constant(0 if variant == "rdml" else 1) for _ in range(3)])
        return self


def data():
    x = torch.tensor(PIXELS).view(6, 1, 1, 3)
    return x, torch.tensor(LABELS)


def _vote(rows):
    return [int(sum(p > 0.5 for p in r) >= 2) for r in rows]


def _corner(eps: float, toward: str = "wrong"):
    """Every pixel moved by ``eps`` towards the wrong class (or the right one), clipped to [0, 1]."""
    s = 1 if toward == "wrong" else -1
    return [tuple(min(1.0, max(0.0, p + s * eps * (1 - 2 * y))) for p in r) for r, y in zip(PIXELS, LABELS)]


def _acc(rows):
    return sum(v == y for v, y in zip(_vote(rows), LABELS)) / len(LABELS)


def test_the_closed_form_itself():
    assert _acc(PIXELS) == 5 / 6
    assert [_acc(_corner(e)) for e in (0.1, 0.2, 0.3, 0.45)] == [0.5, 0.5, 2 / 6, 0.0]
    assert _acc(_corner(0.2, "right")) == 5 / 6  # the last example needs two pixels moved by 0.3


def test_table2_fgsm_bim_pgd_reach_the_corner():
    x, y = data()
    rep = E.table2({"pixels": pixel_net()}, (x, y), n=6, cw_steps=2, progress=False)[0]
    acc = {a.name: rep.accuracy(a.name) for a in rep.attacks}
    assert acc["FGSM (eps 0.2)"] == acc["BIM-10 (eps 0.2)"] == acc["PGD-10 (eps 0.2)"] == _acc(_corner(0.2)) == 0.5
    assert acc["FGSM (eps 0.3)"] == _acc(_corner(0.3)) == 2 / 6
    assert rep.clean.tolist() == [True] * 5 + [False]
    # two Adam steps of lr 0.01 in tanh space move a pixel by at most ~0.01, less than any vote's
    # smallest l2 margin (0.05): CW-2 leaves the clean accuracy
    assert acc["CW (c 1, 2 steps)"] == 5 / 6


def test_transfer_table_moves_only_the_source_members_pixel():
    x, y = data()
    t4 = E.transfer_table(pixel_net(), x, y, eps=0.1, steps=10, batch_size=4)
    assert t4["columns"] == ["Ensemble", "Model 1", "Model 2", "Model 3"] and t4["n"] == 6
    assert t4["rows"]["Benign"] == pytest.approx([5 / 6, 1.0, 4 / 6, 3 / 6])
    # pixel 1 +-0.1 flips member 1 on examples 0, 1, 3, 4 (margin 0.05); the vote then loses 0 and 4
    assert t4["rows"]["Untargeted"] == pytest.approx([3 / 6, 2 / 6, 4 / 6, 3 / 6])
    # two classes: the random target is the other class, the same direction as untargeted
    assert t4["rows"]["Targeted"] == pytest.approx([3 / 6, 2 / 6, 4 / 6, 3 / 6])
    assert t4["target_hit"] == pytest.approx([3 / 6, 4 / 6, 2 / 6, 3 / 6])
    # pixels 1 and 2 swapped, crafted on member 2: the same numbers with models 1 and 2 swapped
    # (crafted on member 1 instead, whose margins are now >= 0.3, nothing would change)
    t4 = E.transfer_table(pixel_net(), x[..., [1, 0, 2]], y, eps=0.1, steps=10, source=1)
    assert t4["rows"]["Untargeted"] == pytest.approx([3 / 6, 4 / 6, 2 / 6, 3 / 6]) and t4["source"] == 1


def test_distortion_curve_and_surrogates_are_the_closed_form():
    x, y = data()
    c = E.distortion_curve(pixel_net(), (x, y), eps_grid=(0.0, 0.1, 0.2, 0.45), n=6, long=3, progress=False)
    want = [5 / 6, _acc(_corner(0.1)), _acc(_corner(0.2)), _acc(_corner(0.45))]
    assert want == [5 / 6, 0.5, 0.5, 0.0]
    assert c["accuracy"] == {a: pytest.approx(want) for a in E.CURVE_ATTACKS} and c["long"] == 3
    rep = E.surrogate_check(pixel_net(), (x, y), steps=3, n=6, progress=False)
    assert [rep.accuracy(a.name) for a in rep.attacks] == [0.5] * 5  # every surrogate is monotone in every pixel
    assert rep.accuracies()["All linf"] == 0.5 and rep.attacks[0].name == "PGD-3 sum, CE (paper)"
    checks = E.masking_checks(c, rep)
    assert [c.passed for c in checks] == [True] * 6 + [None] * 4  # curve and surrogates: all pass


def test_gradient_stats_zero_and_saturated():
    x, y = data()
    assert E.gradient_stats(pixel_net(), x, y) == {"zero_grad": 0.0, "saturated": 0.0, "n": 6}
    # constant members: no input gradient anywhere; the summed logits (gap 60) saturate where y = 1
    assert E.gradient_stats(constant_net(1), x, y) == {"zero_grad": 1.0, "saturated": 0.5, "n": 6}


def test_transfer_between_an_inverted_source_and_the_pixel_vote():
    x, y = data()
    # the inverted members' worst case is the pixel vote's best: the transfer pushes towards the right class
    t = E.transfer_between(pixel_net(-1.0), pixel_net(), x, y, eps=0.2)
    assert t == {"transfer": _acc(_corner(0.2, "right")), "white_box": _acc(_corner(0.2)), "eps": 0.2, "steps": 10,
                 "n": 6}
    check = E.masking_checks(transfer_check={"source": "inverted", **t})[7]
    assert check.passed
    assert check.detail == "PGD crafted on inverted vs white-box PGD on 6 examples, tolerance 50.0 points"
    swapped = {"source": "s", "transfer": t["white_box"], "white_box": t["transfer"]}
    # 33 points stronger: within the 3 examples of 6 that sampling noise may move, beyond it on 60
    assert E.masking_checks(transfer_check={**swapped, "n": 6})[7].passed
    assert E.masking_checks(transfer_check={**swapped, "n": 60})[7].violations == [
        "transferred from s: 50.0% < white-box 83.3% - a transfer attack beats the white-box one"]


def _radius(sigma, n, alpha):
    """Cohen et al.'s radius when all n noisy votes agree: sigma * Phi^-1(alpha^(1/n))."""
    return sigma * NormalDist().inv_cdf(alpha ** (1 / n))


def test_certified_accuracy_of_a_constant_vote_is_the_closed_form():
    x, y = data()
    r25, r50 = _radius(0.25, 50, 0.001), _radius(0.5, 50, 0.001)
    assert 0.25 < r25 < 0.4 < r50 < 0.6  # 0.283 and 0.565: the radii checked below straddle them
    out = E.certified(constant_net(1), x, y, sigmas=(0.25, 0.5), radii=(0.0, 0.4, 0.6), n0=5, n=50)
    assert out["curves"] == {"plain, sigma=0.25": {0.0: 0.5, 0.4: 0.0, 0.6: 0.0},
                             "plain, sigma=0.5": {0.0: 0.5, 0.4: 0.5, 0.6: 0.0}}
    assert (out["n0"], out["n"], out["images"], out["radii"]) == (5, 50, 6, [0.0, 0.4, 0.6])
    # a DML is certified as DML, R-DML and AUG-DML (here: the pixel vote, always 0, always 1)
    out = E.certified(FakeDML(), x[:4], y[:4], sigmas=(0.5,), radii=(0.4,), n0=5, n=50)  # labels 1, 1, 1, 0
    assert out["curves"]["R-DML, sigma=0.5"] == {0.4: 0.25} and out["curves"]["AUG-DML, sigma=0.5"] == {0.4: 0.75}
    assert list(out["curves"]) == ["DML, sigma=0.5", "R-DML, sigma=0.5", "AUG-DML, sigma=0.5"]


def test_rdml_table_runs_both_variants_at_the_strong_radius():
    x, y = data()
    dml_rep, rdml_rep = E.rdml_table(FakeDML(), (x, y), n=6, restarts=2, progress=False)
    assert (dml_rep.model, rdml_rep.model) == ("DML ensemble", "R-DML ensemble")
    names = ["FGSM (eps 0.3)", "PGD-20 (eps 0.3, 2 restarts)", "PGD-40 (eps 0.3, 2 restarts)"]
    assert [a.name for a in dml_rep.attacks] == names
    assert [dml_rep.accuracy(a) for a in names] == [_acc(_corner(0.3))] * 3 == [2 / 6] * 3
    # the "R-DML" stand-in always says class 0: right on the three class-0 examples, whatever the attack
    assert [rdml_rep.accuracy(a) for a in names] == [0.5] * 3 and rdml_rep.clean.tolist() == [False] * 3 + [True] * 3


def test_detection_rates_and_agreement_auc_by_hand():
    x, y = data()
    det = E.detection(pixel_net(), x, y, eps=0.2, draws=1)
    assert det["n"] == 5  # the vote's five right answers
    # at the 0.2 corner every one of the five has exactly two members agreeing; clean: 1, 0, 1, 0, 1 disagree
    for name in ("FGSM", "PGD-10"):
        r = det["attacks"][name]
        assert r["agreement"]["auc"] == pytest.approx(0.4 + 0.5 * 0.6)  # P(adv > benign) + ties / 2
        assert r["frameworks"] == {"majority": {"benign_flagged": 0.0, "adversarial_flagged": 0.0},
                                   "unanimity": {"benign_flagged": pytest.approx(0.6), "adversarial_flagged": 1.0}}
        # the vote loses examples 0 and 4; the summed logits 0, 2 and 4 (sums -0.5, -0.15, +0.5 vs labels 1, 1, 0)
        assert r["vote_fooled"] == pytest.approx(0.4) and r["sum_fooled"] == pytest.approx(0.6)
        assert 0.0 <= r["uncertainty"]["auc"] <= 1.0


def test_cw_distortion_of_each_member_is_its_margin():
    x, y = data()
    t5 = E.cw_distortion(pixel_net(), x, y, steps=300, lr=0.05)
    cols = t5["columns"]
    assert list(cols) == ["Ensemble kappa=0", "Ensemble kappa=0.1", "Model 1", "Model 2", "Model 3"]
    # member m must carry pixel m across 0.5 where it is right (l2 = its margin) and need not move elsewhere
    for m in range(3):
        margins = [abs(r[m] - 0.5) if (r[m] > 0.5) == y else 0.0 for r, y in zip(PIXELS, LABELS)]
        col = cols[f"Model {m + 1}"]
        assert (col["accuracy"], col["success"]) == (0.0, 1.0)
        assert col["distortion"] == pytest.approx(sum(margins) / 6, abs=0.01)
    assert t5["n"] == 6 and t5["targeted"] is True


class Pixel4(Pixel):
    """:class:`Pixel` with two more classes no input reaches (AutoAttack's targeted DLR loss needs
    four classes)."""

    def forward(self, x):
        return torch.cat([super().forward(x), torch.full((len(x), 2), -10.0) * self.w], -1)


@pytest.mark.slow  # torchattacks' Square spends its 5000 queries on the example left robust
def test_autoattack_table_finds_the_corner(monkeypatch):
    x, y = data()
    keep = [0, 1, 4]  # robust at 0.2: example 1 only; at 0.3: none
    # two of MNIST's three radii (0.1 would repeat 0.2's answer at the same cost)
    monkeypatch.setitem(E.SETTINGS, "mnist", {**E.SETTINGS["mnist"], "autoattack": (0.2, 0.3)})
    net = Ensemble([Pixel4(i) for i in range(3)], num_classes=4).eval()
    rep = E.autoattack_table(net, (x[keep], y[keep]), n=3, progress=False)
    parents = [a for a in rep.attacks if not a.parent]
    assert [a.name for a in parents] == ["AutoAttack (eps 0.2)", "AutoAttack (eps 0.3)"]
    assert [rep.accuracy(a.name) for a in parents] == [1 / 3, 0.0]
    assert rep.robust("AutoAttack (eps 0.2)").tolist() == [False, True, False]
    # the catalogue's AutoAttack: one row per sub-attack, whose breaks add up to the parent's
    for parent in parents:
        subs = [a for a in rep.attacks if a.parent == parent.name]
        assert [a.name.split(" > ")[1] for a in subs] == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
        broken = torch.stack([~rep.robust(a.name) for a in subs]).any(0)
        assert broken.tolist() == (~rep.robust(parent.name)).tolist()


def test_masking_checks_read_surrogates_and_cw_by_value():
    from pyens.eval import AttackResult, RobustnessReport

    t = lambda *v: torch.tensor(v * 25, dtype=torch.bool)  # noqa: E731 - 100 examples: a 5-point margin
    rows = [AttackResult("paper", "linf", t(1, 1, 1, 0), eps=0.2), AttackResult("margin", "linf", t(1, 0, 1, 1)),
            AttackResult("soft", "linf", t(0, 1, 1, 1))]
    rep = RobustnessReport("m", t(1, 1, 1, 1), rows)
    failed = lambda checks: [v for c in checks if c.passed is False for v in c.violations]  # noqa: E731
    assert failed(E.masking_checks(surrogates=rep)) == [
        "'paper' 75.0%, per-example best 25.0% (strongest alone 'paper' 75.0%) - the paper's attack surrogate "
        "understates the attack"]
    cw = {"n": 100, "c1": {"accuracy": 0.9}, "ladder": {"accuracy": 0.2, "median_l2": 1.5},
          "unshifted": {"accuracy": 1.0}}
    assert failed(E.masking_checks(cw=cw)) == [
        "CW c = 1 90.0% > ladder 20.0% - the fixed-c CW number reflects the logit scale, not robustness",
        "raw logits 100.0% > shifted 90.0% - torchattacks' CW loses its gradient on these logits; its number is void"]
    assert failed(E.masking_checks(cw={**cw, "c1": {"accuracy": 0.2}, "unshifted": {"accuracy": 0.21}})) == []


def test_render_markdown_lays_out_the_values():
    report = {"dataset": "mnist", "n": 6, "budget": "quick",
              "transfer": {"pixels": {"columns": ["Ensemble", "Model 1"], "eps": 0.1, "steps": 10,
                                      "rows": {"Benign": [5 / 6, 1.0], "Untargeted": [0.5, 1 / 3]},
                                      "target_hit": [0.25, math.nan]}},
              "table5": {"pixels": {"c": 1.0, "steps": 300, "lr": 0.05, "n": 6, "columns": {
                  "Model 1": {"accuracy": 0.0, "success": 1.0, "distortion": 0.15}}}},
              "certified": {"pixels": {"radii": [0.0, 0.5], "curves": {"plain, sigma=0.25": {"0.0": 0.5, "0.5": 0.0}}}}}
    md = dml_markdown(report)
    for line in ("### PGD-10 crafted on Model 1, eps 0.1 (Table 4 layout)", "| pixels | Ensemble | Model 1 |",
                 "| Benign | 83.33 | 100.00 |", "| Untargeted | 50.00 | 33.33 |",
                 "| Targeted: target reached | 25.00 | - |",
                 "### Targeted CW-l2, c = 1, 300 steps, lr 0.05, first 6 images (Table 5 layout)",
                 "| Adversarial accuracy | 0.00 |", "| Target reached | 100.00 |", "| Average distortion (l2) | 0.15 |",
                 "| pixels: layer, sigma | r=0 | r=0.5 |", "| plain, sigma=0.25 | 50.00 | 0.00 |"):
        assert line in md.splitlines(), line


def test_dml_autoattack_is_the_catalogues_and_turns_rand_for_r_dml():
    """Tables 7-8 use the catalogue's AutoAttack, so an R-DML model (random outputs) gets the
    rand version, as every other AutoAttack row of pyens does."""
    from pyens.eval.autoattack import for_randomized

    spec = E.autoattack_spec(0.3)
    assert spec.key == "autoattack_linf" and spec.params == {"eps": 0.3, "version": "standard"}

    class Noisy(torch.nn.Module):
        randomized = True

        def forward(self, x):
            return x.flatten(1)[:, :3]

    x = torch.rand(2, 1, 2, 2)
    (same,), randomized = for_randomized([spec], torch.nn.Flatten(), x)
    assert not randomized and same is spec
    (rand,), randomized = for_randomized([spec], Noisy(), x)
    assert randomized and rand.params["version"] == "rand" and "rand version" in rand.name
