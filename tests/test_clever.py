"""CLEVER scores (pyens.eval.clever, pyens/eval/clever_score.py) and the DML report's CLEVER table (Fig. 1, A.6)."""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from pyens.eval.clever_score import clever, counts, reverse_weibull_loc, sample_ball

HAS_ART = importlib.util.find_spec("art") is not None


class Linear(torch.nn.Module):
    """logits = W x + b: the gradient of g_c - g_j is w_c - w_j everywhere."""

    def __init__(self, d: int = 16, k: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(k, d, generator=g, dtype=torch.float64)
        self.b = torch.randn(k, generator=g, dtype=torch.float64)

    def forward(self, x):
        return x.flatten(1).double() @ self.w.T + self.b


def _closed_form(model: Linear, x, y, q: float, radius: float) -> torch.Tensor:
    z = model(x)
    out = []
    for i in range(len(x)):
        c = int(y[i])
        per = [min(float(z[i, c] - z[i, j]) / float((model.w[c] - model.w[j]).norm(p=q)), radius)
               for j in range(z.shape[1]) if j != c]
        out.append(max(min(per), 0.0))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("norm,q", [("l2", 2.0), ("linf", 1.0), ("l1", math.inf)])
def test_linear_model_scores_are_margin_over_dual_norm(norm, q):
    model = Linear()
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 4  # misclassified: score 0
    for radius in (50.0, 0.05):  # uncapped, then capped for most
        got = clever(model, x, y, norm=norm, radius=radius, batches=5, samples=4, pool=2)
        want = _closed_form(model, x, y, q, radius)
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (got, want)
        assert got[0] == 0
    assert (clever(model, x, y, radius=0.05) == 0.05).sum() >= 1  # the cap is reached


def test_predicted_labels_by_default_and_details():
    model = Linear()
    x = torch.rand(5, 16, dtype=torch.float64)
    pred = model(x).argmax(1)
    r = clever(model, x, None, radius=50.0, details=True, batches=4, samples=2, pool=1)
    assert torch.equal(r.score, clever(model, x, pred, radius=50.0, batches=4, samples=2, pool=1))
    assert torch.equal(r.label, pred)
    dw = (model.w[pred][:, None] - model.w[None]).norm(dim=-1)
    assert torch.allclose(r.lipschitz, dw, rtol=1e-9)
    assert (r.score > 0).all() and not r.zero_grad.any()


class Dead(torch.nn.Module):
    """ReLU features that are dead (zero gradient) below 2: logits = W relu(x - 2) + b."""

    def __init__(self):
        super().__init__()
        self.lin = Linear(d=4, k=3)

    def forward(self, x):
        return self.lin(torch.relu(x - 2.0))


def test_zero_gradient_is_flagged_not_scored():
    model = Dead()
    x = torch.full((3, 4), 0.5, dtype=torch.float64)
    x[2] = 2.5  # inside the live region: a normal score
    y = model(x).argmax(1)
    y[1] = (y[1] + 1) % 3  # misclassified: 0 whatever the gradient
    with pytest.warns(RuntimeWarning, match="1 of 3 examples have an exactly zero gradient"):
        r = clever(model, x, y, radius=0.3, box=None, details=True, batches=4, samples=5, pool=2)
    assert r.zero_grad.tolist() == [True, True, False]
    assert math.isnan(r.score[0]) and r.score[1] == 0 and 0 < r.score[2] <= 0.3
    c = counts(r.score)
    assert c["nan"] == 1 and c["n"] == 3 and c["non_zero"] == 1


def test_reverse_weibull_location():
    from scipy.stats import weibull_max

    d = torch.from_numpy(weibull_max.rvs(3.0, loc=2.0, scale=1.0, size=(4, 3000), random_state=0))
    loc = reverse_weibull_loc(d)
    assert (loc >= d.amax(1)).all()
    assert torch.allclose(loc, torch.full((4,), 2.0, dtype=torch.float64), rtol=0.02), loc
    # the maximum-likelihood estimate itself: scipy's (unconstrained) fit, where its shape is >= 1
    for row, ours in zip(d.numpy(), loc.tolist()):
        shape, scipy_loc, _ = weibull_max.fit(row)
        assert shape > 1 and ours == pytest.approx(scipy_loc, rel=2e-4)
    # ART's pool scheme: maxima of draws (with replacement) from a finite pool repeat its top
    # values. These 30 came from a tanh MLP (test_batched_agrees_with_art's, seed 1); a fit with
    # the shape held >= 1 put the location at 1.92, four times the largest norm seen.
    tied = torch.tensor([[0.4902, 0.4805, 0.4932, 0.4786, 0.48, 0.4932, 0.48, 0.4751, 0.4932, 0.48, 0.4799, 0.4902,
                          0.4816, 0.4816, 0.4932, 0.4816, 0.4902, 0.4784, 0.4902, 0.4752, 0.48, 0.4816, 0.4799,
                          0.4902, 0.4784, 0.4773, 0.4786, 0.4902, 0.4932, 0.4816]], dtype=torch.float64)
    assert float(reverse_weibull_loc(tied)) == pytest.approx(0.4932, rel=1e-3)
    # all-equal rows (a linear model: one gradient norm everywhere) return the value itself
    assert reverse_weibull_loc(torch.full((2, 7), 1.25)).tolist() == [1.25, 1.25]


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_ball_samples_are_uniform_in_the_ball(norm):
    p = {"l2": 2, "linf": math.inf, "l1": 1}[norm]
    v = sample_ball(40000, 2, norm, 3.0, torch.Generator().manual_seed(0), torch.float64)
    r = v.norm(p=p, dim=1)
    assert (r <= 3.0 + 1e-9).all()
    assert abs(float((r <= 1.5).double().mean()) - 0.25) < 0.01  # volume fraction (1/2)^d in d = 2
    assert v.mean(0).abs().max() < 0.03


def test_seeded_and_reproducible():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.rand(4, 6)
    a = clever(net, x, None, batches=5, samples=4, pool=2, seed=3)
    assert torch.equal(a, clever(net, x, None, batches=5, samples=4, pool=2, seed=3))


@pytest.mark.skipif(not HAS_ART, reason="adversarial-robustness-toolbox not installed (pip install 'pyens[art]')")
def test_batched_agrees_with_art():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x = torch.rand(6, 1, 4, 4)
    y = net(x).argmax(1)
    y[5] = (y[5] + 1) % 4  # misclassified: 0 on both paths
    kw = dict(radius=2.0, batches=30, samples=20, pool=5)
    ours = clever(net, x, y, **kw)
    art = clever(net, x, y, backend="art", **kw)
    assert ours[5] == 0 and art[5] == 0
    rel = ((ours - art).abs() / art)[:5]
    # the two draw different points: agreement is up to the estimator's sampling noise
    assert float(rel.median()) < 0.05 and float(rel.max()) < 0.15, (ours, art)


def test_art_backend_missing_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "art" or m.startswith("art.")] + ["art"]:
        monkeypatch.setitem(sys.modules, name, None)  # import art(.x) -> ImportError
    net = torch.nn.Linear(4, 3)
    with pytest.raises(ImportError, match=r"pyens\[art\]"):
        clever(net, torch.rand(2, 4), None, backend="art")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(radius=0.0), ValueError, "radius"),
    (dict(radius=-1.0), ValueError, "radius"),
    (dict(radius=math.nan), ValueError, "radius"),
    (dict(radius=True), ValueError, "radius"),
    (dict(norm="l3"), ValueError, "norm"),
    (dict(batches=2), ValueError, "batches"),
    (dict(samples=0), ValueError, "samples"),
    (dict(pool=1.5), TypeError, "pool"),
    (dict(backend="foolbox"), ValueError, "backend"),
    (dict(box=(1.0, 0.0)), ValueError, "box"),
    (dict(x=torch.tensor([[0.1, math.nan, 0.2, 0.3]])), ValueError, "x contains NaN"),
    (dict(x=torch.rand(4)), ValueError, "x must be"),
    (dict(x=torch.ones(2, 4, dtype=torch.long)), TypeError, "x must be a float"),
    (dict(y=torch.tensor([0, 1, 2])), ValueError, "y must have shape"),
    (dict(y=torch.tensor([0, 3])), ValueError, r"y must hold labels in \[0, 3\)"),
    (dict(y=torch.tensor([-1, 0])), ValueError, "y must hold labels"),
    (dict(y=torch.tensor([0.0, 1.0])), TypeError, "y must be an integer"),
])
def test_bad_arguments_name_themselves(kwargs, exc, match):
    net = torch.nn.Linear(4, 3)
    args = dict(x=torch.rand(2, 4), y=torch.tensor([0, 1]))
    args.update({k: kwargs.pop(k) for k in ("x", "y") if k in kwargs})
    with pytest.raises(exc, match=match):
        clever(net, args["x"], args["y"], **kwargs)


def test_counts():
    s = torch.tensor([0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 2.0, math.nan], dtype=torch.float64)
    assert counts(s) == {"n": 8, "nan": 1, "non_zero": 6, "0.2": 5, "1": 3, "2": 2}


class TwoMembers(torch.nn.Module):
    """Two identical linear members, logits x[:3] of the flattened [B, 1, 2, 2] input: near the
    boundary between classes 0 and 1, so CW finds adversarial examples at a short distance."""

    def member_logits(self, x):
        z = x.flatten(1)[:, :3]
        return torch.stack([z, z], 1)


def test_dml_report_clever_table_and_flags(tmp_path, monkeypatch):
    from pyens.eval import clever_score as C
    from pyens.eval import dml as E
    from pyens.eval.markdown import clever_markdown, dml_markdown
    from pyens.eval.plots import plot_clever

    net = TwoMembers()
    x = torch.tensor([[0.5, 0.45, 0.1, 0.3], [0.6, 0.5, 0.2, 0.9], [0.3, 0.2, 0.25, 0.5]]).view(3, 1, 2, 2)
    y = torch.zeros(3, dtype=torch.long)
    budget = dict(clever_n=3, clever_batches=3, clever_samples=2, clever_pool=1, cw_steps=30)
    report = E.dml_report({"lin": net}, (x, y), tables=("clever",), n=3, progress=False, budget=budget,
                          log=lambda *_: None)
    t = report["clever"]["models"]["lin"]
    # linear: CLEVER is the exact distance to the nearest boundary (margin 0.05 over class 1 or 2)
    want = torch.tensor([0.05, 0.1, 0.05]) / math.sqrt(2)
    assert torch.allclose(torch.tensor(t["score"], dtype=torch.float64), want.double(), rtol=1e-3)
    assert all(d is not None and d >= w * (1 - 1e-3) for d, w in zip(t["distance"], want.tolist()))
    both = [[v if v is not None else math.inf for v in t[key]] for key in ("distance_cw", "distance_pgd")]
    assert t["distance"] == [min(a, b) for a, b in zip(*both)] and math.isfinite(sum(both[1]))
    assert "images 3 (paper preset 1000)" in report["clever"]["reductions"]
    md = dml_markdown(report)
    assert "CLEVER scores (Fig. 1, A.6)" in md and "| lin | 3 | 3 | 0 | 0 | 0 | 0 | 3 |" in md
    assert plot_clever(report["clever"], tmp_path / "c.png").stat().st_size > 0

    # a CLEVER that claims the whole ball for every image is flagged wherever CW found a shorter
    # adversarial example
    real = C.clever

    def claims_radius(model, x, y, **kw):
        r = real(model, x, y, **kw)
        r.score = torch.full_like(r.score, 2.0)
        return r

    monkeypatch.setattr(C, "clever", claims_radius)
    t = E.clever_table(net, x, y, batches=3, samples=2, pool=1, cw_steps=30, progress=False)
    assert t["flagged"] == [True, True, True] and t["flagged_count"] == 3 and t["found"] == 3
    assert "Images where CLEVER exceeds" in clever_markdown({"radius": 2.0, "models": {"lin": t}})

    # a score equal to the distance found up to float32 rounding (a capped score against PGD on
    # the sphere of that radius) is no contradiction; 1 % more is
    found = torch.tensor(t["distance"], dtype=torch.float64)
    for factor, flags in ((1 + 1e-6, [False] * 3), (1.01, [True] * 3)):
        def claims(model, x, y, factor=factor, **kw):
            r = real(model, x, y, **kw)
            r.score = found * factor
            return r

        monkeypatch.setattr(C, "clever", claims)
        assert E.clever_table(net, x, y, batches=3, samples=2, pool=1, cw_steps=30, progress=False)["flagged"] == flags
