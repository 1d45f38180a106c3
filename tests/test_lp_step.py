"""lp_project / steepest_direction / lp_step: every backend against the float64 reference.

The reference itself is checked against a generic QP solver (scipy) on small rows, so the
chain "backend == reference == true projection" has no untested link.
"""

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import pyens
from pyens.ops import lp_project, lp_step, steepest_direction, use_backend
from pyens.ops.dispatch import forget_choices, through_registered_ops
from pyens.ops.contract import DIRECTION, L1, L2, LINF, PROJECT
from pyens.ops.selftest import make_rows  # rows with the hard cases built in
from pyens.reference.lp_step import lp_rows as reference_rows
from tests.conftest import CALL_PATHS, TOLERANCES, assert_close, backend_params

PAPER = {LINF: (0.3, 0.01), L2: (2.0, 0.1), L1: (10.0, 0.8)}  # MNIST eps, alpha (Appendix C)
NAMES = {LINF: "linf", L2: "l2", L1: "l1"}


def run_path(path, backend, mode, d, g, x, norms, eps, alpha, k, lo, hi, exact):
    """The public function of ``mode`` on rows ``[R, n]`` laid out as ``[R/M, M, n]``, on its
    eager fast path (``path="function"``) or through the registered op (``path="op"``)."""
    m = len(norms)
    shape = (d.shape[0] // m, m, d.shape[1])
    d3, g3, x3 = (t.reshape(shape) for t in (d, g, x))
    kw = dict(norm=[NAMES[c] for c in norms], box=(lo, hi), members=m)
    projection = "exact" if exact else "sequential"
    with use_backend(backend), (through_registered_ops() if path == "op" else contextlib.nullcontext()):
        if mode == PROJECT:
            out = lp_project(d3, x3, eps=eps, projection=projection, **kw)
        elif mode == DIRECTION:
            out = steepest_direction(g3, x3, d3, k=k, **kw)
        else:
            out = lp_step(d3, g3, x3, eps=eps, alpha=alpha, k=k, projection=projection, **kw)
    return out.reshape(d.shape)


def run_backend(backend, *args):
    from pyens.ops.dispatch import OPS

    with use_backend(backend):
        _, kernel = OPS["lp_step"].select(args[3].device, args[3].dtype, args[3].shape[1])
    return kernel(*args)


# ---------------------------------------------------------------------------------------------
# the reference against an independent QP solver

@pytest.mark.parametrize("norm", [L2, L1])
@pytest.mark.parametrize("seed", range(4))
def test_reference_is_the_true_projection(norm, seed):
    """Exact projection == argmin ||z - y||^2 s.t. ||z||_p <= eps, a <= z <= b (SLSQP, n = 7)."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    d, _, x = make_rows(4, 7, torch.float64, seed, scale=1.0)
    eps = 0.8 if norm == L2 else 1.2
    out, _ = reference_rows(0, d, d, x, [norm], [eps], [0.0], [1], 0.0, 1.0, True)
    for r in range(d.shape[0]):
        y, xr = d[r].numpy(), x[r].numpy()
        lo, hi = np.minimum(-xr, 0), np.maximum(1 - xr, 0)
        if norm == L2:
            cons = [{"type": "ineq", "fun": lambda z: eps**2 - z @ z, "jac": lambda z: -2 * z}]
            z0 = np.zeros_like(y)
        else:  # split z = p - q with p, q >= 0 makes the l1 ball linear
            cons = [{"type": "ineq", "fun": lambda w: eps - w.sum(), "jac": lambda w: -np.ones_like(w)}]
            z0 = np.zeros(2 * y.size)
        if norm == L2:
            res = scipy_optimize.minimize(lambda z: ((z - y) ** 2).sum(), z0, jac=lambda z: 2 * (z - y),
                                          bounds=list(zip(lo, hi)), constraints=cons, method="SLSQP",
                                          options={"ftol": 1e-12, "maxiter": 500})
            z = res.x
        else:
            k = y.size
            bounds = [(0, max(h, 0)) for h in hi] + [(0, max(-l, 0)) for l in lo]
            res = scipy_optimize.minimize(lambda w: ((w[:k] - w[k:] - y) ** 2).sum(), z0,
                                          jac=lambda w: np.concatenate([2 * (w[:k] - w[k:] - y), -2 * (w[:k] - w[k:] - y)]),
                                          bounds=bounds, constraints=cons, method="SLSQP",
                                          options={"ftol": 1e-12, "maxiter": 500})
            z = res.x[:k] - res.x[k:]
        # Ours is feasible and no worse than the generic solver's optimum; the projection is
        # unique, so it is also the same point (to the solver's accuracy).
        ours = out[r].numpy()
        assert np.all(ours >= lo - 1e-12) and np.all(ours <= hi + 1e-12)
        assert np.linalg.norm(ours, 2 if norm == L2 else 1) <= eps * (1 + 1e-12)
        assert ((ours - y) ** 2).sum() <= ((z - y) ** 2).sum() + 1e-9
        np.testing.assert_allclose(ours, z, atol=1e-4)


def test_reference_l1_direction_by_hand():
    g = torch.tensor([[0.5, -3.0, 2.0, -2.0, 2.0, 0.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[0.5, 0.0, 0.5, 0.5, 1.0, 0.5, 0.5]], dtype=torch.float64)
    d = torch.zeros_like(x)
    # index 1 sits at lo with g < 0 and index 4 at hi with g > 0: not movable; index 5 has g = 0.
    out, _ = reference_rows(1, d, g, x, [L1], [1.0], [1.0], [2], 0.0, 1.0, True)
    assert out.tolist() == [[0.0, 0.0, 0.5, -0.5, 0.0, 0.0, 0.0]]  # |g| = 2 tie: lowest indices 2, 3
    out, _ = reference_rows(1, d, g, x, [L1], [1.0], [1.0], [50], 0.0, 1.0, True)
    assert out.tolist() == [[0.25, 0.0, 0.25, -0.25, 0.0, 0.0, 0.25]]  # k > movable count: all 4


# ---------------------------------------------------------------------------------------------
# every backend against the reference

SIZES = [1, 7, 784, 3072]


def _compare(backend, mode, norms, dtype, n, exact, seed, eps=None, alpha=None, k=None, rows=None, path=None):
    """Backend vs the float64 reference; ``path`` None runs the kernel itself, "function" and
    "op" the public function on its fast path and through the registered op."""
    m = len(norms)
    rows = rows or (2 * m if backend == "triton" else max(6, 2 * m))
    rows = -(-rows // m) * m
    d, g, x = make_rows(rows, n, dtype, seed)
    eps = eps or [PAPER[c][0] for c in norms]
    alpha = alpha or [PAPER[c][1] for c in norms]
    k = k or [20] * m
    args = (mode, d, g, x, norms, eps, alpha, k, 0.0, 1.0, exact)
    if path is None:
        got, flags = run_backend(backend, *args)
        assert flags.item() == 0
    else:
        got = run_path(path, backend, *args)
    want, _ = reference_rows(mode, d.double(), g.double(), x.double(), norms, eps, alpha, k, 0.0, 1.0, exact)
    assert got.dtype == dtype and got.shape == d.shape
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, max(eps)) if mode != 1 else 1.0
    assert_close(got, want, rtol=rtol, atol=atol * scale, what=f"{backend} mode={mode} norms={norms} n={n} {dtype}")
    return got, want


@pytest.mark.parametrize("backend", backend_params("lp_step"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("norm", [LINF, L2, L1], ids=["linf", "l2", "l1"])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["project", "direction", "step"])
@pytest.mark.parametrize("path", CALL_PATHS)
def test_backend_matches_reference(backend, dtype, n, norm, mode, path):
    for exact in ([True, False] if mode != 1 else [True]):
        got, want = _compare(backend, mode, [norm], dtype, n, exact, seed=n + 7 * norm + 31 * mode, path=path)
        if mode == 1 and norm == L1:  # discrete selection: must be the same coordinates
            assert torch.equal(got != 0, want.to(got.dtype) != 0)


@pytest.mark.parametrize("n", [63, 64, 65, 130, 159, 1000])
@pytest.mark.parametrize("k", [1, 8, 20, 64, 200])
def test_cpu_l1_top_k_around_its_groups(n, k):
    """The CPU top-k bounds tau by maxima of lane-strided groups of 8 within 64-score chunks:
    row lengths around those chunk sizes (full, partial and lone tail chunks), k from 1 to
    more than the group count, with ties and box-blocked coordinates, select exactly the
    reference's coordinates."""
    if "cpu" not in pyens.ops.available_backends("lp_step", "cpu"):
        pytest.skip("the C++ CPU backend is not built")
    for exact in (True, False):
        got, want = _compare("cpu", 1, [L1], torch.float32, n, exact, seed=n * 7 + k, k=[k], rows=8)
        assert torch.equal(got != 0, want.to(got.dtype) != 0)
        got, _ = _compare("cpu", 2, [L1], torch.float32, n, exact, seed=n * 7 + k + 1, k=[k], rows=8)


@pytest.mark.parametrize("backend", backend_params("lp_step"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n", [7, 784])
@pytest.mark.parametrize("path", [None, *CALL_PATHS])
def test_mixed_members_one_launch(backend, dtype, n, path):
    """MAT's inner step: members (l1, l2, linf) with their own eps/alpha/k in one call."""
    for mode in (0, 1, 2):
        _compare(backend, mode, [L1, L2, LINF], dtype, n, True, seed=5 + mode, k=[5, 20, 20], path=path)


@pytest.mark.parametrize("backend", backend_params("lp_step"))
@pytest.mark.parametrize("n", [7, 784])
@pytest.mark.parametrize("case", ["eps0", "eps_huge", "k_large", "alpha0", "x_outside_box", "big_delta"])
def test_edge_cases(backend, n, case):
    norms = [L1, L2, LINF]
    kw = {}
    if case == "eps0":
        kw["eps"] = [0.0, 0.0, 0.0]
    elif case == "eps_huge":
        kw["eps"] = [1e6, 1e6, 1e6]
    elif case == "k_large":
        kw["k"] = [10 * n, 10 * n, 10 * n]
    elif case == "alpha0":
        kw["alpha"] = [0.0, 0.0, 0.0]
    for mode in (0, 2):
        for exact in (True, False):
            if case == "x_outside_box":
                d, g, x = make_rows(6, n, torch.float64, 3)
                x = x * 1.4 - 0.2
                args = (mode, d, g, x, norms, [10.0, 2.0, 0.3], [0.8, 0.1, 0.01], [20] * 3, 0.0, 1.0, exact)
                got, _ = run_backend(backend, *args)
                want, _ = reference_rows(*args)
                assert_close(got, want, rtol=1e-9, atol=1e-9, what=case)
            elif case == "big_delta":
                d, g, x = make_rows(6, n, torch.float64, 4, scale=5.0)
                args = (mode, d, g, x, norms, [10.0, 2.0, 0.3], [0.8, 0.1, 0.01], [20] * 3, 0.0, 1.0, exact)
                got, _ = run_backend(backend, *args)
                want, _ = reference_rows(*args)
                assert_close(got, want, rtol=1e-9, atol=1e-9, what=case)
            else:
                got, _ = _compare(backend, mode, norms, torch.float64, n, exact, seed=11, **kw)
                if case == "eps0":
                    assert torch.count_nonzero(got) == 0


@pytest.mark.parametrize("backend", backend_params("lp_step"))
@pytest.mark.parametrize("bad", ["delta", "grad", "x"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_names_the_argument(backend, bad, value):
    d, g, x = make_rows(3, 7, torch.float32, 0)
    tensors = {"delta": d, "grad": g, "x": x}
    tensors[bad] = tensors[bad].clone()
    tensors[bad][1, 3] = value
    with use_backend(backend):
        with pytest.raises(ValueError, match=rf"lp_step: {bad} contains NaN or infinity"):
            lp_step(tensors["delta"], tensors["grad"], tensors["x"], norm="l2", eps=1.0, alpha=0.1)


# ---------------------------------------------------------------------------------------------
# public API: layouts, dtypes, strides, autograd

def test_member_layout_equals_per_member_calls():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 1, 6, 6)
    d = (torch.rand_like(x) - 0.5) * 0.2
    g = torch.randn_like(x)
    norms, eps, alpha, k = ("l1", "l2", "linf"), (2.0, 0.5, 0.03), (0.5, 0.1, 0.01), (4, 20, 20)
    out = lp_step(d, g, x, norm=norms, eps=eps, alpha=alpha, k=k, members=3)
    assert out.shape == x.shape
    for m in range(3):
        single = lp_step(d[:, m], g[:, m], x[:, m], norm=norms[m], eps=eps[m], alpha=alpha[m], k=k[m])
        torch.testing.assert_close(out[:, m], single, rtol=0, atol=0)


def test_norm_spellings_and_scalar_members():
    x = torch.rand(4, 2, 10)
    d, g = torch.zeros_like(x), torch.randn_like(x)
    a = lp_step(d, g, x, norm=float("inf"), eps=0.1, alpha=0.05, members=2)
    b = lp_step(d, g, x, norm=["linf", "Linf"], eps=[0.1, 0.1], alpha=0.05, members=2)
    torch.testing.assert_close(a, b)
    for spelled, code in ((2, "l2"), (1, "l1"), ("L2", "l2")):
        torch.testing.assert_close(lp_step(d, g, x, norm=spelled, eps=0.5, alpha=0.2),
                                   lp_step(d, g, x, norm=code, eps=0.5, alpha=0.2))


def test_non_contiguous_inputs():
    torch.manual_seed(1)
    base = torch.rand(7, 3, 16)
    x = base.transpose(0, 1)[:, ::2]      # [3, 4, 16]? strided view
    d = torch.randn(16, 4, 3).permute(2, 1, 0) * 0.1
    g = torch.randn(3, 4, 32)[..., ::2]
    assert not (x.is_contiguous() or d.is_contiguous() or g.is_contiguous())
    out = lp_step(d, g, x, norm="l1", eps=1.0, alpha=0.3, k=3)
    ref = lp_step(d.contiguous(), g.contiguous(), x.contiguous(), norm="l1", eps=1.0, alpha=0.3, k=3)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.is_contiguous()


def test_outputs_carry_no_autograd_history():
    x = torch.rand(3, 10)
    d = torch.zeros(3, 10, requires_grad=True)
    g = torch.randn(3, 10, requires_grad=True)
    for out in (lp_step(d, g, x, norm="l2", eps=1.0, alpha=0.1), lp_project(d, x, norm="l1", eps=1.0),
                steepest_direction(g, x, d, norm="l1", k=2)):
        assert not out.requires_grad and out.grad_fn is None


def test_half_precision_on_cpu_falls_back_to_reference():
    d, g, x = make_rows(4, 50, torch.float16, 2, scale=0.05)
    forget_choices()  # the fallback warns once per process; an earlier test may have seen it
    with pytest.warns(RuntimeWarning, match="reference backend"):
        out = lp_step(d, g, x, norm="l2", eps=0.5, alpha=0.1)
    assert out.dtype == torch.float16
    want = lp_step(d.float(), g.float(), x.float(), norm="l2", eps=0.5, alpha=0.1)
    torch.testing.assert_close(out.float(), want, rtol=5e-3, atol=5e-3)


def test_empty_batch():
    x = torch.rand(0, 3, 5)
    out = lp_step(x, x, x, norm=("l1", "l2", "linf"), eps=(1, 1, 1), alpha=(0.1, 0.1, 0.1), members=3)
    assert out.shape == (0, 3, 5)


def test_steepest_direction_is_unit_size():
    torch.manual_seed(2)
    g, x = torch.randn(6, 100, dtype=torch.float64), torch.rand(6, 100, dtype=torch.float64)
    assert torch.equal(steepest_direction(g, x, norm="linf"), torch.sign(g))
    torch.testing.assert_close(steepest_direction(g, x, norm="l2").norm(dim=1), torch.ones(6, dtype=torch.float64))
    v = steepest_direction(g, x, norm="l1", k=7)
    torch.testing.assert_close(v.abs().sum(1), torch.ones(6, dtype=torch.float64))
    assert ((v != 0).sum(1) == 7).all()
    assert torch.equal(steepest_direction(torch.zeros_like(g), x, norm="l2"), torch.zeros_like(g))


# ---------------------------------------------------------------------------------------------
# properties (hypothesis)

@st.composite
def problems(draw):
    n = draw(st.integers(1, 40))
    rows = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    norm = draw(st.sampled_from(["linf", "l2", "l1"]))
    eps = draw(st.sampled_from([0.0, 0.05, 0.5, 2.0, 1e3]))
    scale = draw(st.sampled_from([0.01, 0.3, 3.0]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, n, generator=gen, dtype=torch.float64)
    x = torch.where(torch.rand(rows, n, generator=gen) < 0.2, x.round(), x)  # some coordinates on the box
    d = torch.randn(rows, n, generator=gen, dtype=torch.float64) * scale
    return d, x, norm, eps


def _lp(z, norm):
    return {"linf": z.abs().amax(1), "l2": z.norm(dim=1), "l1": z.abs().sum(1)}[norm] if z.shape[1] else torch.zeros(z.shape[0])


@settings(max_examples=150, deadline=None)
@given(problems())
def test_projection_lands_in_ball_and_box(problem):
    d, x, norm, eps = problem
    for projection in ("exact", "sequential"):
        z = lp_project(d, x, norm=norm, eps=eps, projection=projection)
        assert (_lp(z, norm) <= eps * (1 + 1e-9) + 1e-12).all()
        assert ((x + z) >= -1e-12).all() and ((x + z) <= 1 + 1e-12).all()


@settings(max_examples=150, deadline=None)
@given(problems())
def test_projection_is_idempotent_and_leaves_interior_points(problem):
    d, x, norm, eps = problem
    z = lp_project(d, x, norm=norm, eps=eps)
    torch.testing.assert_close(lp_project(z, x, norm=norm, eps=eps), z, rtol=1e-9, atol=1e-9)
    interior = (_lp(d, norm) <= eps) & ((x + d) >= 0).all(1) & ((x + d) <= 1).all(1)
    assert torch.equal(z[interior], d[interior])


@settings(max_examples=150, deadline=None)
@given(problems())
def test_exact_is_never_farther_than_sequential(problem):
    d, x, norm, eps = problem
    exact = lp_project(d, x, norm=norm, eps=eps, projection="exact")
    seq = lp_project(d, x, norm=norm, eps=eps, projection="sequential")
    assert ((exact - d).norm(dim=1) <= (seq - d).norm(dim=1) + 1e-9).all()


@settings(max_examples=100, deadline=None)
@given(problems(), st.integers(1, 30))
def test_step_stays_feasible_and_l1_moves_alpha(problem, k):
    d, x, norm, eps = problem
    d = lp_project(d, x, norm=norm, eps=eps)
    g = torch.randn_like(d)
    z = lp_step(d, g, x, norm=norm, eps=eps, alpha=0.1, k=k)
    assert (_lp(z, norm) <= eps * (1 + 1e-9) + 1e-12).all()
    assert ((x + z) >= -1e-12).all() and ((x + z) <= 1 + 1e-12).all()
    v = steepest_direction(g, x, d, norm="l1", k=k)
    p = x + d
    movable = ((g != 0) & ~((p >= 1) & (g > 0)) & ~((p <= 0) & (g < 0))).sum(1)
    moved = v.abs().sum(1)
    torch.testing.assert_close(moved, (movable > 0).double(), rtol=0, atol=1e-12)
    assert torch.equal((v != 0).sum(1), movable.clamp(max=k))


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile

def _op_samples():
    torch.manual_seed(3)
    x = torch.rand(4, 3, 12, dtype=torch.float64)
    d = torch.randn_like(x) * 0.2
    g = torch.randn_like(x)
    lists = dict(norms=[2, 1, 0])
    return [
        (torch.ops.pyens.lp_step, (d, g, x, 3, lists["norms"], [1.0, 0.5, 0.1], [0.3, 0.1, 0.01], [3, 20, 20], 0.0, 1.0, True)),
        (torch.ops.pyens.lp_project, (d, x, 3, lists["norms"], [1.0, 0.5, 0.1], 0.0, 1.0, False)),
        (torch.ops.pyens.steepest_direction, (g, x, d, 3, lists["norms"], [3, 20, 20], 0.0, 1.0)),
        (torch.ops.pyens.lp_step, (d[:, 0].float(), g[:, 0].float(), x[:, 0].float(), 0, [1], [0.5], [0.1], [20], 0.0, 1.0, True)),
    ]


@pytest.mark.parametrize("i", range(4))
def test_opcheck(i):
    op, args = _op_samples()[i]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def pgd(x, g):
        delta = torch.zeros_like(x)
        for _ in range(3):
            delta = lp_step(delta, g, x, norm=("l1", "l2", "linf"), eps=(2.0, 0.5, 0.1), alpha=(0.5, 0.2, 0.05),
                            k=(4, 20, 20), members=3)
        return x + delta

    x = torch.rand(2, 3, 20)
    g = torch.randn_like(x)
    compiled = torch.compile(pgd, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x, g), pgd(x, g))


def test_torch_compile_traces_without_warnings():
    """Dynamo warned that it ignores the lru_cache of the parameter parsing: it is skipped while tracing."""
    import warnings

    torch._dynamo.reset()

    def step(x, g):
        return lp_step(torch.zeros_like(x), g, x, norm=["l1", "l2", "linf"], eps=[2.0, 0.5, 0.1],
                       alpha=[0.5, 0.2, 0.05], members=3)

    x = torch.rand(2, 3, 20)
    g = torch.randn_like(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(step, fullgraph=True, backend="eager")(x, g)
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]
    torch.testing.assert_close(out, step(x, g))


def test_sequence_parameters_need_members():
    """[8, 3, 32, 32] with three norms: the RGB channels are not members unless members=3 says so."""
    x = torch.rand(8, 3, 32, 32)
    d, g = torch.zeros_like(x), torch.randn_like(x)
    per_member = dict(norm=("l1", "l2", "linf"), eps=(10.0, 2.0, 0.3), alpha=(0.8, 0.1, 0.01))
    for fn, kwargs in ((lp_step, per_member), (lp_project, dict(norm=["l1", "l2", "linf"], eps=1.0)),
                       (steepest_direction, dict(norm="l1", k=(2, 3, 4)))):
        args = (d, g, x) if fn is lp_step else (d, x) if fn is lp_project else (g, x)
        with pytest.raises(ValueError, match="need members=3"):
            fn(*args, **kwargs)
        assert fn(*args, **kwargs, members=3).shape == x.shape  # asked for: the member layout
    with pytest.raises(ValueError, match=r"eps given per member \(length 3\) need members=3"):
        lp_step(d, g, x, norm="linf", eps=torch.tensor([0.1, 0.2, 0.3]), alpha=0.01)


# ---------------------------------------------------------------------------------------------
# bad input

def _args():
    x = torch.rand(4, 3, 5)
    return torch.zeros_like(x), torch.randn_like(x), x


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(norm="l3", eps=1.0, alpha=0.1), ValueError, "norm must be 'linf', 'l2' or 'l1'"),
    (dict(norm="l2", eps=-1.0, alpha=0.1), ValueError, "eps must be >= 0"),
    (dict(norm="l2", eps=float("nan"), alpha=0.1), ValueError, "eps must be finite"),
    (dict(norm="l2", eps=1.0, alpha=-0.1), ValueError, "alpha must be >= 0"),
    (dict(norm="l1", eps=1.0, alpha=0.1, k=0), ValueError, "k must be >= 1"),
    (dict(norm="l1", eps=1.0, alpha=0.1, k=2.5), TypeError, "k must be an int"),
    (dict(norm=("l1", "l2"), eps=1.0, alpha=0.1, members=2), ValueError,
     r"with 2 members, delta must be \[B, 2, ...\]"),
    (dict(norm=("l1", "l2", "linf"), eps=1.0, alpha=0.1), ValueError,
     r"norm given per member \(length 3\) need members=3"),
    (dict(norm=("l1", "l2", "linf"), eps=(1.0, 2.0), alpha=0.1), ValueError, "must share one length"),
    (dict(norm=("l1", "l2", "linf"), eps=(1.0, -2.0, 3.0), alpha=0.1, members=3), ValueError, r"eps\[1\] must be >= 0"),
    (dict(norm="l2", eps=1.0, alpha=0.1, box=(1.0, 0.0)), ValueError, "box must be finite with lo <= hi"),
    (dict(norm="l2", eps=1.0, alpha=0.1, projection="fast"), ValueError, r"projection must be one of \('exact', 'sequential'\)"),
])
def test_bad_parameters(kwargs, exc, match):
    d, g, x = _args()
    with pytest.raises(exc, match=match):
        lp_step(d, g, x, **kwargs)


def test_bad_tensors():
    d, g, x = _args()
    with pytest.raises(ValueError, match=r"lp_step: grad must have delta's shape \(4, 3, 5\), got \(4, 3\)"):
        lp_step(d, g[:, :, 0], x, norm="l2", eps=1.0, alpha=0.1)
    with pytest.raises(TypeError, match="lp_step: x must have delta's dtype torch.float32, got torch.float64"):
        lp_step(d, g, x.double(), norm="l2", eps=1.0, alpha=0.1)
    with pytest.raises(TypeError, match="lp_step: grad must be a floating-point tensor"):
        lp_step(d, g.long(), x, norm="l2", eps=1.0, alpha=0.1)
    with pytest.raises(TypeError, match="lp_step: x must be a torch.Tensor"):
        lp_step(d, g, x.tolist(), norm="l2", eps=1.0, alpha=0.1)
    with pytest.raises(ValueError, match="lp_project: delta must have a batch dimension"):
        lp_project(torch.tensor(0.5), torch.tensor(0.5), norm="l2", eps=1.0)
    with pytest.raises(ValueError, match="lp_step: x must be on delta's device cpu, got meta"):
        lp_step(d, g, x.to("meta"), norm="l2", eps=1.0, alpha=0.1)  # a device mismatch without a GPU


def test_backend_forcing_and_report(monkeypatch):
    report = pyens.ops.backends()
    assert set(report["lp_step"]) == {"cpu", "cuda"}
    assert report["lp_step"]["cpu"]["selected"] in ("cpu", "reference")
    if not torch.cuda.is_available():
        assert "cuda" in report["lp_step"]["cpu"]["why_not"]
        d, g, x = _args()
        with use_backend("cuda"), pytest.raises(pyens.ops.BackendUnavailableError, match="backend 'cuda' was forced"):
            lp_step(d, g, x, norm="l2", eps=1.0, alpha=0.1)
    monkeypatch.setenv("PYENS_BACKEND", "reference")
    assert pyens.ops.backends()["lp_step"]["cpu"]["selected"] == "reference"
    with use_backend("auto"):
        assert pyens.ops.backends()["lp_step"]["cpu"]["selected"] in ("cpu", "reference")
    monkeypatch.setenv("PYENS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="PYENS_BACKEND"):
        pyens.ops.backends()
    with pytest.raises(ValueError, match="use_backend: name must be one of"):
        with use_backend("gpu"):
            pass


def test_required_backends_are_present():
    """CI sets PYENS_REQUIRE_BACKENDS=cpu,triton: a build that lost a backend fails here."""
    from tests.conftest import REQUIRED

    usable = pyens.ops.available_backends("lp_step", "cpu")
    missing = sorted(REQUIRED - set(usable))
    assert not missing, f"required backends unavailable: {missing}: {pyens.ops.backends()['lp_step']['cpu']['why_not']}"


def test_triton_limit_matches_kernel():
    triton_kernels = pytest.importorskip("pyens.kernels.lp_step")
    from pyens.ops.lp_step import TRITON_MAX_N

    assert triton_kernels.MAX_N == TRITON_MAX_N


@pytest.mark.parametrize("backend", [p for p in backend_params("lp_step", ("triton",))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_compute_in_float32(backend, dtype):
    """Half inputs, float32 math: equal to the float32 reference on the upcast values, to one
    ulp of the output dtype (Triton's interpreter truncates float32 -> bfloat16)."""
    for mode in (0, 1, 2):
        d, g, x = make_rows(6, 97, dtype, 8, scale=0.05)
        args = (mode, d, g, x, [L1, L2, LINF], [2.0, 0.5, 0.03], [0.3, 0.1, 0.01], [5, 20, 20], 0.0, 1.0, True)
        got, flags = run_backend(backend, *args)
        want, _ = reference_rows(mode, d.float(), g.float(), x.float(), *args[4:])
        assert got.dtype == dtype and flags.item() == 0
        rtol, atol = TOLERANCES[dtype]
        assert_close(got, want.to(dtype), rtol=rtol, atol=atol, what=f"{backend} {dtype} mode={mode}")
