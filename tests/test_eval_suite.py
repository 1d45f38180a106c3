"""Transfer tables, diagnostics, curves, sanity checks, plots and ``pyens report``."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pyens.eval import catalogue, evaluate
from pyens.eval.catalogue import preset_params, quick_alpha
from pyens.eval.curves import distortion_curve, robustness_curves
from pyens.eval.diagnostics import gradient_cosine, steepest_disagreement
from pyens.eval.sanity import flagged, run_checks
from pyens.eval.transfer import TransferReport, members_of, submodel_table, transfer_matrix
from tests.eval_helpers import linear, one_thread  # noqa: F401 (autouse fixture)


def _pgd(steps):
    """The "pgd" preset's PGD with ``steps`` steps (step sizes scaled to match)."""
    eps = {"linf": 0.3, "l2": 2.0, "l1": 10.0}
    return {k: {**p, "steps": steps, "alpha": quick_alpha(p["norm"], eps[p["norm"]], steps)}
            for k, p in preset_params("pgd", "mnist").items()}


class Constant(nn.Module):
    """Ignores its input: always class ``c`` (zero input gradient)."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return nn.functional.one_hot(torch.full((len(x),), self.c), 10).float() * 5 + 0 * self.w * x.flatten(1)[:, :1]


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    x = torch.rand(24, 1, 8, 8)
    with torch.no_grad():
        y = linear()(x).argmax(1)
    return x, y


def test_transfer_counts_on_an_ensemble_with_a_known_answer(data):
    from pyens.nn import Ensemble

    x, y = data
    a = linear()
    b = linear()  # identical to a: every attack transfers perfectly between them
    c = Constant(int(y[0]))  # right exactly on the examples of class y[0], whatever the input
    ens = Ensemble([a, b, c], num_classes=10).eval()
    r = transfer_matrix(ens, (x, y), norm="linf", eps=0.3, alpha=0.1, steps=5, n=24, batch_size=10, progress=False)
    n_c = int((y != y[0]).sum())
    N = r.counts()
    assert r.sources == r.targets == ["Sub-model 1", "Sub-model 2", "Sub-model 3", "Ensemble"]
    assert N[0, 0] == N[0, 1] == N[1, 0] == N[1, 1] > 0 and r.ratio(0, 1) == 1.0
    assert N[0, 2] == N[1, 2] == N[2, 2] == N[3, 2] == n_c  # the constant model's errors never change
    assert N[2, 0] == N[2, 1] == 0  # crafted on a zero gradient: x itself, which a and b get right
    assert r.clean_wrong.sum(-1).tolist() == [0, 0, n_c, int(r.clean_wrong[3].sum())]
    assert r.robust_accuracy()["Sub-model 3"] == pytest.approx(1 - n_c / 24)
    text = r.table()
    assert "Sub-model 1" in text and "(100.0%)" in text and text.splitlines()[-1].startswith("No attack")
    back = TransferReport.from_dict(json.loads(json.dumps(r.to_dict())))
    assert torch.equal(back.counts(), N)
    assert submodel_table([r], markdown=True).startswith("| Attack | Ensemble | Sub-model 1 |")


def test_members_of_plugs_any_ensemble():
    class Listed:
        members = [nn.Identity(), nn.Identity()]

    assert len(members_of(Listed())) == 2
    from pyens.nn import MIMO

    assert len(members_of(MIMO("small_cnn", members=3, in_channels=1, num_classes=10))) == 3
    with pytest.raises(ValueError, match="no sub-models"):
        members_of(nn.Linear(2, 2))


class SlotLinear(nn.Module):
    """A MIMO backbone whose head m reads only slot m (``cross=False``), or all slots."""

    def __init__(self, c_in, k_out, members=3, cross=False):
        super().__init__()
        self.m, self.cross = members, cross
        torch.manual_seed(2)
        self.lin = nn.Linear(c_in * 64, k_out)
        if not cross:
            mask = torch.zeros(k_out, c_in * 64)
            per_in, per_out = 64 * c_in // members, k_out // members
            for j in range(members):
                mask[j * per_out:(j + 1) * per_out, j * per_in:(j + 1) * per_in] = 1
            self.register_buffer("mask", mask)

    def forward(self, z):
        w = self.lin.weight if self.cross else self.lin.weight * self.mask
        return nn.functional.linear(z.flatten(1), w, self.lin.bias)


def test_steepest_disagreement_is_zero_without_cross_gradients_and_positive_with(data):
    from pyens.nn import MIMO, mimo_batch

    x, y = data
    xm, ym = mimo_batch(x, y, 3, generator=torch.Generator().manual_seed(0))
    for cross in (False, True):
        mimo = MIMO(lambda c, k, cross=cross: SlotLinear(c, k, cross=cross), members=3, in_channels=1,
                    num_classes=10).eval()
        e = steepest_disagreement(mimo, xm, ym)
        assert set(e) == {"l1", "linf"} and e["linf"].shape == (3,)
        if cross:
            assert (e["linf"] > 0.05).all() and (e["l1"] > 0).all() and (e["l1"] <= 40 / 64).all()
        else:
            assert (e["linf"] == 0).all() and (e["l1"] == 0).all()


def test_gradient_cosine_of_identical_and_opposite_members(data):
    x, y = data
    a = linear()
    neg = linear()
    with torch.no_grad():
        neg[1].weight.neg_()
    cos = gradient_cosine([a, linear(), neg], x, y)
    assert cos["pairs"] == [(0, 1), (0, 2), (1, 2)]
    assert torch.allclose(cos["grad"][0], torch.ones(24)) and torch.allclose(cos["sign"][0], torch.ones(24))
    assert cos["grad"].shape == (3, 24)


class Quantized(nn.Module):
    """Gradient masking by construction: a rounding layer (zero gradient) before the model."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


@pytest.mark.parametrize("masked", [False, True])
def test_sanity_checks_fire_on_a_gradient_masked_model_and_stay_quiet_on_a_plain_one(data, masked):
    x, y = data
    net = linear()
    model = Quantized(net) if masked else net
    with torch.no_grad():
        y = model(x).argmax(1)
    specs = catalogue("quick", "mnist", only=["pgd_linf", "pgd_l1", "salt_pepper"],
                      params={"pgd_linf": dict(steps=10, alpha=0.05), "pgd_l1": dict(steps=10, alpha=2.0),
                              "salt_pepper": dict(steps=50)})
    rep = evaluate(model, (x, y), attacks=specs, n=24, progress=False)
    curves = robustness_curves(model, (x, y), dataset="mnist", pgd=_pgd(10), n=24, progress=False,
                               checkpoints=(1, 5, 20), fractions=(0.0, 0.5, 1.0, 2.0))
    checks = {c.name: c for c in run_checks(rep, curves)}
    assert flagged(checks.values()) == masked
    if masked:
        assert checks["unbounded attack reaches ~0%"].passed is False
        assert checks["black-box attacks not stronger than white-box"].passed is False
        assert checks["random noise weaker than PGD"].passed is False
        assert "gradient masking" in checks["unbounded attack reaches ~0%"].verdict
    else:
        assert all(c.passed for c in checks.values() if c.name != "transfer attacks not stronger than white-box")
        assert checks["transfer attacks not stronger than white-box"].passed is None  # no members


def test_transfer_check_fires_when_a_transfer_beats_white_box(data):
    x, y = data
    t = torch.zeros(2, 2, 24, dtype=torch.bool)
    t[0, 1, :10] = True  # crafted on 1, judged by 2: 10 errors; 2's own attack: none
    r = TransferReport("m", "linf", 0.3, ["Sub-model 1", "Sub-model 2"], ["Sub-model 1", "Sub-model 2"], t,
                       torch.zeros(2, 24, dtype=torch.bool))
    (check,) = [c for c in run_checks(transfers=[r]) if c.name.startswith("transfer")]
    assert check.passed is False and "Sub-model 2 errs on 10 > 0" in check.violations[0]


def test_curves_and_plots_are_written(tmp_path, data):
    from pyens.eval import plots

    x, y = data
    model = linear()
    curves = robustness_curves(model, (x, y), dataset="mnist", pgd=_pgd(5), n=16, progress=False, checkpoints=(1, 5),
                               fractions=(0.0, 1.0))
    assert curves.steps["l2"]["steps"] == [1, 5] and len(curves.radius["l1"]["accuracy"]) == 2
    assert curves.radius["linf"]["accuracy"][0] == curves.clean == 1.0
    specs = catalogue("quick", "mnist", only=["pgd_l2", "cw_l2"],
                      params={"pgd_l2": dict(steps=5, alpha=0.5), "cw_l2": dict(binary_search_steps=2, steps=20)})
    rep = evaluate(model, (x, y), attacks=specs, n=16, progress=False)
    radii, acc = distortion_curve(rep, specs[1].name)
    assert acc[0] == 1.0 and acc == sorted(acc, reverse=True)
    hist = {"mat": [{"epoch": e, "cross_gradient_ratio": [1 / e, 2 / e],
                     "steepest_disagreement": {"l1": [0.01, 0.02], "linf": [0.3 / e, 0.2]}} for e in (1, 2, 3)]}
    cos = gradient_cosine([model, linear(1)], x, y)
    paths = [plots.plot_curves([curves], tmp_path / "c.png"), plots.plot_distortion(rep, tmp_path / "d.png", curves),
             plots.plot_cross_gradient(hist, tmp_path / "x.png", ["l1", "l2"]),
             plots.plot_disagreement(hist, tmp_path / "e.png"), plots.plot_cosine({"m": cos}, tmp_path / "h.png")]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_pyens_report_on_a_tiny_mat_run_and_on_a_saved_evaluation(tmp_path):
    import pyens

    run = tmp_path / "tiny-mat"
    pyens.train("mat", train_size=20, batch_size=10, epochs=1, steps=1, out=str(run), progress=False)
    hist = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(hist["steepest_disagreement"]) == {"l1", "linf"} and len(hist["grad_cosine"]) == 3
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "pyens", "report", str(run), "--out", str(out), "--attacks", "pgd", "--n", "6",
           "--no-curves", "--no-progress", *[f"--set=pgd_{p}.steps=5" for p in ("linf", "l2", "l1")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "report.md").read_text()
    for needle in ("Table 4 layout", "**All attacks**", "## Transferability: tiny-mat", "| MAT |", "Sanity check",
                   "cross_gradient.png", "disagreement.png", "gradient_cosine.png", "distortion-tiny-mat.png"):
        assert needle in md, needle
    assert all((out / f).stat().st_size > 0 for f in ("cross_gradient.png", "disagreement.png"))
    saved = tmp_path / "saved"  # a saved evaluation alone: reported without the model
    saved.mkdir()
    (saved / "eval.json").write_text((out / "data" / "tiny-mat" / "eval.json").read_text())
    from pyens.eval.run_report import Settings, report_runs

    path = report_runs([saved], tmp_path / "again", Settings(progress=False))
    assert "| Attack | saved |" in path.read_text()


def test_pgd_restarts_start_at_random_points():
    """--eval-restarts N > 1 means N random starts: from delta = 0 they would be one run N times."""
    from pyens.eval.catalogue import pgd_specs

    one, many = pgd_specs("mnist"), pgd_specs("mnist", restarts=5)
    assert [s.params["random_start"] for s in one] == [False] * 3
    assert [(s.params["random_start"], s.params["restarts"]) for s in many] == [(True, 5)] * 3
    assert all(s.make(nn.Linear(784, 10)).random_start for s in many)
