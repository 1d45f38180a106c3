"""mahalanobis / randomized_mahalanobis: every backend against the float64 reference.

The reference is itself checked against scipy's ``cdist(..., "mahalanobis", VI=F^T F)``, so
the chain "backend == reference == textbook Mahalanobis distance" has no untested link.
Gradients are compared with float64 autograd of the plain formula (the reference) and
checked by gradcheck.  The Triton backend runs under TRITON_INTERPRET=1 here (slow): it gets
small shapes.
"""
import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import pyens
from pyens.ops import mahalanobis, mahalanobis_noise, randomized_mahalanobis, use_backend
from pyens.ops.dispatch import through_registered_ops
from pyens.ops.mahalanobis import MAHALANOBIS_BACKWARD
from pyens.ops.selftest import make_points as make  # x, P, centers (one sample on a center)
from pyens.reference import mahalanobis as ref
from tests.conftest import CALL_PATHS, TOLERANCES, assert_close, backend_params

FORMS = ("diag", "tril", "full")
BACKENDS = backend_params("mahalanobis")


def reference_grads(x, P, c, form, eps=1e-12, weights=None):
    """float64 values and autograd gradients of the plain formula."""
    ins = [t.detach().double().requires_grad_() for t in (x, P, c)]
    d = ref.mahalanobis(*ins, form=ref.FORMS[form], eps=eps)
    w = torch.ones_like(d) if weights is None else weights.double()
    return (d.detach(), *torch.autograd.grad(d, ins, w))


def on_path(path):
    """The eager fast path (``"function"``) or the registered op (``"op"``)."""
    return through_registered_ops() if path == "op" else contextlib.nullcontext()


def run(backend, fn, *tensors, weights=None, path="function", **kw):
    """Forward and gradients of ``fn`` on ``backend``, on call path ``path``."""
    ins = [t.detach().clone().requires_grad_() for t in tensors]
    with use_backend(backend), on_path(path):
        d = fn(*ins, **kw)
        w = torch.ones_like(d) if weights is None else weights.to(d.dtype)
        return (d.detach(), *torch.autograd.grad(d, ins, w))


def close(got, want, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    for name, g, w in zip(("d", "dx", "dP", "dcenters"), got, want):
        assert g.dtype == dtype, f"{what} {name}: dtype {g.dtype}"
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        assert_close(g, w, rtol=rtol, atol=atol * scale, what=f"{what} {name}")


# ---------------------------------------------------------------------------------------------
# the reference against scipy

@pytest.mark.parametrize("form", FORMS)
def test_reference_matches_scipy_cdist(form):
    distance = pytest.importorskip("scipy.spatial.distance")
    x, P, c = make(9, 3, 4, 6, form, hit=False)
    d = ref.mahalanobis(x, P, c, form=ref.FORMS[form], eps=0.0)
    F = ref.dense_factor(P, ref.FORMS[form])
    for e in range(3):
        VI = (F[e].T @ F[e]).numpy()
        want = distance.cdist(x.numpy(), c[e].numpy(), "mahalanobis", VI=VI)
        np.testing.assert_allclose(d[:, e].numpy(), want, rtol=1e-12, atol=1e-12)


def test_reference_member_layout_and_forms_agree():
    x, P, c = make(5, 3, 4, 6, "full", shared=False)
    xs = x[:, 1]
    d_member = ref.mahalanobis(x, P, c, form=ref.FULL)
    d_shared = ref.mahalanobis(xs, P, c, form=ref.FULL)
    torch.testing.assert_close(d_member[:, 1], d_shared[:, 1], rtol=0, atol=0)
    p = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(ref.mahalanobis(xs, p, c, form=ref.DIAG),
                               ref.mahalanobis(xs, torch.diag_embed(p), c, form=ref.FULL))


# ---------------------------------------------------------------------------------------------
# the noise stream

def test_philox_known_answer_and_triton_stream():
    """Random123's known-answer vector, and the same stream as Triton's tl.randint4x."""
    r = ref.philox4x32(torch.tensor([0]), 0)
    assert [int(v) for v in r] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    r = ref.philox4x32(torch.tensor([(1 << 32) - 1 + (5 << 32)]), 0xDEADBEEF12345)
    assert all(0 <= int(v) < 2**32 for v in r)


@pytest.mark.parametrize("backend", backend_params("mahalanobis", ("cpu", "triton")))
def test_noise_is_bit_identical_on_every_backend(backend):
    shape = (3, 2, 17, 17) if backend == "triton" else (5, 3, 31, 31)  # triton: 2 blocks of 1024
    for seed in (0, 12345, 2**62 + 7):
        want = ref.normal_noise(seed, shape)
        with use_backend(backend):
            got = mahalanobis_noise(seed, shape)
        assert got.dtype == torch.float32 and torch.equal(got, want), f"{backend} seed={seed}"


def test_noise_is_standard_normal():
    stats = pytest.importorskip("scipy.stats")
    z = mahalanobis_noise(2024, (200_000,)).double()
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / z.numel())
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    # and close to the exact Box-Muller of the same uniforms (the polynomials are ~1 ulp)
    r = ref.philox4x32(torch.arange(1000), 2024)
    u1 = ((r[0] >> 9).double() + 0.5) * 2.0**-23
    u2 = ((r[1] >> 9).double() + 0.5) * 2.0**-23
    exact = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    torch.testing.assert_close(z[0:4000:4], exact, rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# every backend against the reference

# (B, E, C, N): difference form; GEMM expansion (N >= 32); GEMM expansion with the tril factor's
# products split in halves around its zero block (N >= 128, odd so that the halves differ)
CPU_SHAPES = [(37, 3, 7, 11), (33, 2, 5, 67), (9, 2, 3, 131)]


# Triton (interpreted): one tile, and one spanning several 16-wide tiles in b, c and n (B = 33:
# three b-tiles, C = 17 and N = 18: two each), which a dropped tile offset would fail.
TRITON_SHAPES = [(5, 2, 3, 6), (33, 2, 17, 18)]


def _shapes(backend):
    return TRITON_SHAPES if backend == "triton" else CPU_SHAPES


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-x", "member-x"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("path", CALL_PATHS)
def test_backend_matches_reference(backend, dtype, shared, form, path):
    for shape in _shapes(backend):
        x, P, c = make(*shape, form, shared=shared, dtype=dtype, seed=sum(shape))
        w = torch.randn(shape[0], shape[1], shape[2], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        got = run(backend, mahalanobis, x, P, c, weights=w, form=form, path=path)
        want = reference_grads(x, P, c, form, weights=w)
        close(got, want, dtype, f"{backend} {form} {shape}")
        # the sample on a center: exactly sqrt(eps), and a zero (finite) gradient there
        e, cc = shape[1] - 1, shape[2] - 1
        torch.testing.assert_close(got[0][1, e, cc].double(), torch.tensor(1e-6, dtype=torch.float64),
                                   rtol=1e-3 if dtype == torch.float32 else 1e-9, atol=0)


@pytest.mark.parametrize("backend", backend_params("mahalanobis", ("cpu",)))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared-x", "member-x"])
def test_many_close_pairs_across_tiles_and_members(backend, form, shared):
    """Samples a hair from centers in several members, b-tiles (B = 70 > two 32-column tiles)
    and centers: the close pairs leave the fast path in the forward and in the backward's
    weights; values and gradients still match the float64 reference."""
    B, E, C, N = 70, 3, 4, 10
    x, P, c = make(B, E, C, N, form, shared=shared, dtype=torch.float32, seed=5, hit=False)
    gen = torch.Generator().manual_seed(6)
    for b, e, cc in [(0, 0, 0), (1, 0, 3), (33, 1, 2), (34, 1, 2), (65, 2, 1), (69, 2, 3), (40, 0, 1)]:
        xb = x[b] if shared else x[b, e]
        c[e, cc] = xb + 1e-4 * torch.randn(N, generator=gen)
    w = torch.randn(B, E, C, generator=gen, dtype=torch.float64)
    got = run(backend, mahalanobis, x, P, c, weights=w, form=form)
    want = reference_grads(x, P, c, form, weights=w)
    close(got, want, torch.float32, f"{backend} {form} close pairs")


@pytest.mark.parametrize("backend", backend_params("mahalanobis", ("cpu",)))
@pytest.mark.parametrize("shared", [True, False], ids=["shared-x", "member-x"])
def test_split_lower_factor_each_gradient_alone(backend, shared):
    """The large-N tril products skip the factor's zero block, gradient by gradient: each of
    dx, dP, dcenters asked alone (the others not computed) matches the float64 reference."""
    B, E, C, N = 6, 2, 3, 129
    x, P, c = make(B, E, C, N, "tril", shared=shared, seed=3)
    w = torch.randn(B, E, C, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want = reference_grads(x, P, c, "tril", weights=w)
    for i in range(3):
        ins = [t.clone().requires_grad_(j == i) for j, t in enumerate((x, P, c))]
        with use_backend(backend):
            (g,) = torch.autograd.grad(mahalanobis(*ins, form="tril"), [ins[i]], w)
        assert_close(g, want[1 + i], rtol=1e-9, atol=1e-9, what=f"gradient {i} alone")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("path", CALL_PATHS)
def test_gradient_at_a_center_is_finite(backend, form, path):
    """x = c: d = sqrt(eps) and the gradient of that distance is exactly 0 (also for eps = 0)."""
    N = 6 if backend == "triton" else 40  # 40: the CPU's expansion path recomputes the pair
    x, P, c = make(3, 2, 2, N, form, hit=False)
    c[0, 1] = x[2]
    only = torch.zeros(3, 2, 2, dtype=torch.float64)
    only[2, 0, 1] = 1.0
    for eps in (1e-12, 0.0):
        d, *grads = run(backend, mahalanobis, x, P, c, form=form, eps=eps, weights=only, path=path)
        assert d[2, 0, 1].item() == pytest.approx(math.sqrt(eps), abs=1e-15)
        for g in grads:
            assert torch.isfinite(g).all() and g.abs().max().item() < 1e-9


@pytest.mark.parametrize("backend", backend_params("mahalanobis", ("reference", "cpu")))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("path", CALL_PATHS)
def test_gradcheck(backend, form, path):
    x, P, c = make(3, 2, 3, 4, form, hit=False)
    ins = [t.requires_grad_() for t in (x, P, c)]
    with use_backend(backend), on_path(path):
        assert torch.autograd.gradcheck(lambda a, b, cc: mahalanobis(a, b, cc, form=form), ins)
        noise = torch.randn(2, 2, 4, 4, dtype=torch.float64)  # the seed's path is tested against it below
        assert torch.autograd.gradcheck(
            lambda a, b, cc: randomized_mahalanobis(a, b, cc, form=form, sigma=0.3, noise=noise), ins)
    if backend == "cpu":  # the CPU's expansion path (N >= 32), on x only for speed
        x, P, c = make(2, 1, 2, 40, form, hit=False)
        with use_backend(backend), on_path(path):
            assert torch.autograd.gradcheck(lambda a: mahalanobis(a, P, c, form=form), [x.requires_grad_()])


@pytest.mark.parametrize("backend", backend_params("mahalanobis", ("triton",)))
def test_gradcheck_triton_fast_mode(backend):
    x, P, c = make(2, 2, 2, 3, "tril", hit=False)
    ins = [t.requires_grad_() for t in (x, P, c)]
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b, cc: mahalanobis(a, b, cc, form="tril"), ins, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", CALL_PATHS)
def test_only_needed_gradients(backend, path, monkeypatch):
    """The backward is one kernel call that receives needs_input_grad and computes only those;
    on the fast path the backward implementation is spied on, through the registered op the
    profiler reads its ``needs`` argument."""
    seen = []
    real = MAHALANOBIS_BACKWARD.impl

    def spy(*args):
        seen.append(list(args[-1]))
        out = real(*args)
        for n, g in zip(args[-1], out):
            assert n or g.numel() == 0
        return out

    monkeypatch.setattr(MAHALANOBIS_BACKWARD, "impl", spy)
    x, P, c = make(4, 2, 3, 5, "tril")
    for needs in ([True, False, False], [False, True, False], [False, False, True], [True, True, True]):
        ins = [t.clone().requires_grad_(n) for t, n in zip((x, P, c), needs)]
        with use_backend(backend), on_path(path), torch.profiler.profile(record_shapes=True) as prof:
            mahalanobis(*ins).sum().backward()
        if path == "op":
            calls = [ev.concrete_inputs[-1] for ev in prof.events() if ev.name == "pyens::mahalanobis_backward"]
            assert len(calls) == 1
            seen.append(list(calls[0]))
        assert seen[-1] == needs
        for t, n in zip(ins, needs):
            assert (t.grad is not None) == n
    assert len(seen) == 4


@pytest.mark.parametrize("path", CALL_PATHS)
def test_call_paths_are_what_they_say(path):
    """The fast path skips the dispatcher; through_registered_ops() goes through the
    registered op, forward and backward (so the tests run under it test that op)."""
    x, P, c = (t.requires_grad_() for t in make(4, 2, 3, 5, "tril"))
    with on_path(path), torch.profiler.profile() as prof:
        mahalanobis(x, P, c).sum().backward()
    names = {ev.name for ev in prof.events()}
    via_op = {"pyens::mahalanobis", "pyens::mahalanobis_backward"} <= names
    assert via_op == (path == "op") and (path == "op" or not names & {"pyens::mahalanobis", "pyens::mahalanobis_backward"})


def test_upper_triangle_is_ignored_and_nan_propagates():
    x, P, c = make(6, 2, 3, 8, "tril")
    P2 = P.clone()
    P2[:, 0, 5] = float("nan")  # upper part: never read
    P2[:, 1, 7] = 1e30
    torch.testing.assert_close(mahalanobis(x, P2, c), mahalanobis(x, P, c), rtol=0, atol=0)
    xn = x.clone()
    xn[3, 2] = float("nan")
    d = mahalanobis(xn, P, c)
    assert torch.isnan(d[3]).all() and torch.isfinite(d[torch.arange(6) != 3]).all()
    Pn = P.clone()
    Pn[1, 4, 2] = float("nan")
    d = mahalanobis(x, Pn, c)
    assert torch.isnan(d[:, 1]).all() and torch.isfinite(d[:, 0]).all()


def test_empty_and_non_contiguous():
    x, P, c = make(0, 2, 3, 5, "full")
    x.requires_grad_()
    d = mahalanobis(x, P, c, form="full")
    assert d.shape == (0, 2, 3)
    d.sum().backward()
    assert x.grad.shape == (0, 5)
    x, P, c = make(6, 2, 3, 5, "full", shared=False)
    xt, Pt, ct = x.transpose(0, 1).contiguous().transpose(0, 1), P.transpose(1, 2).contiguous().transpose(1, 2), c[:, ::1]
    assert not xt.is_contiguous()
    torch.testing.assert_close(mahalanobis(xt, Pt, ct, form="full"), mahalanobis(x, P, c, form="full"))


def test_half_on_cpu_falls_back_to_reference():
    x, P, c = make(5, 2, 3, 6, "tril", dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="reference backend"):
        d = mahalanobis(x, P, c)
    assert d.dtype == torch.bfloat16
    torch.testing.assert_close(d.float(), mahalanobis(x.float(), P.float(), c.float()), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("backend", backend_params("mahalanobis", ("triton",)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_compute_in_float32(backend, dtype):
    x, P, c = make(4, 2, 3, 6, "tril", dtype=dtype)
    got = run(backend, mahalanobis, x, P, c)
    want = reference_grads(x.float(), P.float(), c.float(), "tril")  # the upcast values, exactly
    close(got, [w.to(dtype) for w in want], dtype, f"{backend} {dtype}")


def test_fast_backend_never_forms_the_difference_tensor():
    """No op inside the cpu backend sees a [B, E, C, N] tensor (the eager composite does)."""
    B, E, C, N = 11, 3, 5, 7
    for form, n in (("tril", N), ("diag", N), ("full", 66)):
        x, P, c = make(B, E, C, n, form)
        ins = [t.requires_grad_() for t in (x, P, c)]
        with torch.profiler.profile(record_shapes=True) as prof:
            with use_backend("cpu"):
                mahalanobis(*ins, form=form).sum().backward()
                randomized_mahalanobis(*ins, form=form, sigma=0.1, samples=2, seed=1).sum().backward()
        shapes = [tuple(s) for ev in prof.events() for s in (ev.input_shapes or []) if s]
        assert (B, E, C, n) not in shapes and (B, E, C, n, n) not in shapes, form


# ---------------------------------------------------------------------------------------------
# randomized DML

def _rdml(*tensors, **kw):
    return randomized_mahalanobis(*tensors, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_randomized_sigma_zero_is_the_deterministic_op(backend, form):
    x, P, c = make(5, 2, 3, 6, form)
    want = run(backend, mahalanobis, x, P, c, form=form)
    got = run(backend, _rdml, x, P, c, form=form, sigma=0.0, samples=2, seed=3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", backend_params("mahalanobis", ("cpu", "triton")))
@pytest.mark.parametrize("path", CALL_PATHS)
def test_randomized_matches_reference_on_explicit_noise_and_seed(backend, path):
    """Explicit noise: the same result on every backend; a seed: the same draws everywhere."""
    # Triton: a short member-x row (interpreter time; test_backend_matches_reference spans the
    # tiles, test_noise_is_bit_identical_on_every_backend the noise kernel's blocks)
    member_shape = (5, 2, 4, 7) if backend == "triton" else (5, 2, 4, 66)
    for form in FORMS:
        for shared, shape in ((True, (6, 2, 3, 5)), (False, member_shape)):
            x, P, c = make(*shape, form, shared=shared)
            noise = torch.randn(3, shape[1], shape[3], shape[3], dtype=torch.float64)
            want = run("reference", _rdml, x, P, c, form=form, sigma=0.4, noise=noise)
            got = run(backend, _rdml, x, P, c, form=form, sigma=0.4, noise=noise, path=path)
            close(got, want, torch.float64, f"{backend} {form} explicit noise")
            want = run("reference", _rdml, x, P, c, form=form, sigma=0.4, samples=3, seed=77)
            got = run(backend, _rdml, x, P, c, form=form, sigma=0.4, samples=3, seed=77, path=path)
            close(got, want, torch.float64, f"{backend} {form} seed")
            # and the seed's draws are the noise mahalanobis_noise returns
            z = mahalanobis_noise(77, (3, shape[1], shape[3], shape[3]))
            close(run(backend, _rdml, x, P, c, form=form, sigma=0.4, noise=z, path=path), want, torch.float64, "noise of seed")


@pytest.mark.parametrize("backend", backend_params("mahalanobis", ("reference", "cpu")))
def test_randomized_same_seed_same_result(backend):
    x, P, c = make(7, 3, 4, 9, "tril", dtype=torch.float32)
    a = run(backend, _rdml, x, P, c, sigma=0.5, samples=5, seed=123)
    b = run(backend, _rdml, x, P, c, sigma=0.5, samples=5, seed=123)
    other = run(backend, _rdml, x, P, c, sigma=0.5, samples=5, seed=124)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], other[0])
    # seed=None draws from torch's generator: torch.manual_seed governs it
    torch.manual_seed(5)
    first = randomized_mahalanobis(x, P, c, sigma=0.5, samples=2)
    torch.manual_seed(5)
    assert torch.equal(first, randomized_mahalanobis(x, P, c, sigma=0.5, samples=2))
    assert not torch.equal(first, randomized_mahalanobis(x, P, c, sigma=0.5, samples=2))


def test_randomized_monte_carlo_converges():
    """N = 1: g = |x - c| E|p + sigma z| (a folded normal), so the estimator's error is known."""
    p, sigma, gap = 0.7, 0.5, 1.3
    x = torch.tensor([[gap]], dtype=torch.float64)
    P = torch.tensor([[[p]]], dtype=torch.float64)
    c = torch.zeros(1, 1, 1, dtype=torch.float64)
    mean = sigma * math.sqrt(2 / math.pi) * math.exp(-p * p / (2 * sigma**2)) + p * math.erf(p / (sigma * math.sqrt(2)))
    var = p * p + sigma * sigma - mean * mean
    truth = gap * mean
    errors = []
    for T in (16, 256, 4096):
        g = randomized_mahalanobis(x, P, c, sigma=sigma, samples=T, seed=T, form="full", eps=0.0).item()
        errors.append(abs(g - truth))
        assert errors[-1] < 4.5 * gap * math.sqrt(var / T), (T, g, truth)
    assert errors[-1] < errors[0]


def test_randomized_saves_no_per_sample_state():
    """R-DML memory does not grow with T: the autograd graph holds the same bytes for T = 2 and 64."""
    x, P, c = make(6, 2, 3, 5, "tril")
    ins = [t.requires_grad_() for t in (x, P, c)]
    saved = {}
    for T in (2, 64):
        nbytes = []

        def pack(t, nbytes=nbytes):
            nbytes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            randomized_mahalanobis(*ins, sigma=0.2, samples=T, seed=1).sum().backward()
        saved[T] = sum(nbytes)
    assert saved[2] == saved[64]


# ---------------------------------------------------------------------------------------------
# properties (hypothesis)

@st.composite
def problems(draw):
    N = draw(st.integers(1, 12))
    B, E, C = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    form = draw(st.sampled_from(FORMS))
    shared = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    x, P, c = make(B, E, C, N, form, shared=shared, seed=seed, hit=False)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return x * scale, P, c * scale, form


@settings(max_examples=60, deadline=None)
@given(problems())
def test_distances_are_nonnegative_and_zero_at_the_centers(problem):
    x, P, c, form = problem
    d = mahalanobis(x, P, c, form=form, eps=0.0)
    assert (d >= 0).all()
    on = c.clone()
    on[:, 0] = x[0]
    d = mahalanobis(x, P, on, form=form, eps=1e-12)
    assert torch.allclose(d[0, :, 0], torch.full_like(d[0, :, 0], 1e-6), rtol=1e-9, atol=0)


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 2**31 - 1))
def test_invariant_under_rotation_of_the_factor(problem, seed):
    """M = P^T P is unchanged by P -> Q P for orthogonal Q, so are the distances (form='full')."""
    x, P, c, form = problem
    F = ref.dense_factor(P, ref.FORMS[form])
    N = F.shape[-1]
    Q, _ = torch.linalg.qr(torch.randn(F.shape[0], N, N, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    want = mahalanobis(x, F, c, form="full", eps=0.0)
    torch.testing.assert_close(mahalanobis(x, Q @ F, c, form="full", eps=0.0), want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mahalanobis(x, P, c, form=form, eps=0.0), want, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(problems(), st.floats(-4, 4).filter(lambda a: abs(a) > 1e-3))
def test_homogeneous_in_the_factor(problem, alpha):
    x, P, c, form = problem
    torch.testing.assert_close(mahalanobis(x, alpha * P, c, form=form, eps=0.0),
                               abs(alpha) * mahalanobis(x, P, c, form=form, eps=0.0), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile

def _op_samples():
    """Each sample gets its own tensors (the backward ops are not differentiable again)."""
    def tril():
        return make(4, 2, 3, 5, "tril")

    x, P, c = tril()
    d, ut, v = torch.ops.pyens.mahalanobis(x, P, c, 1, 1e-12)
    g = torch.randn_like(d)
    xm, Pd, cm = make(4, 2, 3, 5, "diag", shared=False)
    seed = torch.tensor(7)
    noise = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    xg, Pg, cg = tril()
    xr, Pr, cr = tril()
    return [
        (torch.ops.pyens.mahalanobis, (xg.requires_grad_(), Pg.requires_grad_(), cg, 1, 1e-12)),
        (torch.ops.pyens.mahalanobis, (xm, Pd.requires_grad_(), cm, 0, 0.0)),
        (torch.ops.pyens.mahalanobis_backward, (g, x, P, c, d, ut, v, 1, 1e-12, [True, False, True])),
        (torch.ops.pyens.randomized_mahalanobis, (x, P, c, None, seed, 3, 0.2, 2, 1e-12)),
        (torch.ops.pyens.randomized_mahalanobis, (xr, Pr, cr.requires_grad_(), noise, seed, 2, 0.2, 1, 1e-12)),
        (torch.ops.pyens.randomized_mahalanobis_backward,
         (g, x, P, c, None, seed, 3, 0.2, 1, 1e-12, [True, True, True])),
    ]


@pytest.mark.parametrize("i", range(6), ids=["fwd-tril", "fwd-diag", "bwd", "rdml-seed", "rdml-noise", "rdml-bwd"])
def test_opcheck(i):
    """Schema, fake kernel, autograd registration and AOT dispatch of the registered ops."""
    torch.library.opcheck(*_op_samples()[i])


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, P, c = make(6, 2, 3, 5, "tril", dtype=torch.float32)

    def layer(x, P, c):
        logits = -mahalanobis(x, P, c) - randomized_mahalanobis(x, P, c, sigma=0.1, samples=2, seed=4)
        return torch.nn.functional.cross_entropy(logits.sum(1), torch.arange(6) % 3)

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    eager_in = [t.clone().requires_grad_() for t in (x, P, c)]
    comp_in = [t.clone().requires_grad_() for t in (x, P, c)]
    want = layer(*eager_in)
    got = compiled(*comp_in)
    torch.testing.assert_close(got, want)
    want.backward()
    got.backward()
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------------------
# bad input

def _good(form="tril"):
    x, P, c = make(4, 2, 3, 5, form, dtype=torch.float32)
    return x, P, c


@pytest.mark.parametrize("change, exc, match", [
    (dict(form="upper"), ValueError, r"mahalanobis: form must be 'diag', 'tril' or 'full', got 'upper'"),
    (dict(P=torch.zeros(2, 5)), ValueError, r"mahalanobis: P must be \[E, N, N\] = \[2, 5, 5\] for form='tril', got \(2, 5\)"),
    (dict(form="diag"), ValueError, r"mahalanobis: P must be \[E, N\] = \[2, 5\] for form='diag', got \(2, 5, 5\)"),
    (dict(x=torch.zeros(4, 6)), ValueError, r"mahalanobis: x must be \[B, N\] = \[B, 5\] or \[B, E, N\]"),
    (dict(x=torch.zeros(4, 3, 5)), ValueError, r"mahalanobis: x must be \[B, N\]"),
    (dict(centers=torch.zeros(3, 5)), ValueError, r"mahalanobis: centers must be \[E, C, N\], got \(3, 5\)"),
    (dict(centers=torch.zeros(3, 3, 5)), ValueError, r"mahalanobis: P must be \[E, N, N\] = \[3, 5, 5\]"),
    (dict(P=torch.zeros(2, 5, 5, dtype=torch.float64)), TypeError, "mahalanobis: P must have x's dtype torch.float32, got torch.float64"),
    (dict(centers=torch.zeros(2, 3, 5, device="meta")), ValueError, "mahalanobis: centers must be on x's device cpu, got meta"),
    (dict(x=torch.zeros(4, 5, dtype=torch.int64)), TypeError, "mahalanobis: x must be a floating-point tensor"),
    (dict(P=[[1.0]]), TypeError, "mahalanobis: P must be a torch.Tensor"),
    (dict(eps=-1.0), ValueError, "mahalanobis: eps must be >= 0, got -1.0"),
    (dict(eps=float("nan")), ValueError, "mahalanobis: eps must be finite"),
])
def test_bad_input_names_the_argument(change, exc, match):
    x, P, c = _good()
    args = dict(x=x, P=P, centers=c)
    kw = {k: change.pop(k) for k in list(change) if k in ("form", "eps")}
    args.update(change)
    with pytest.raises(exc, match=match):
        mahalanobis(args["x"], args["P"], args["centers"], **kw)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(sigma=-0.1, samples=2), ValueError, "randomized_mahalanobis: sigma must be >= 0, got -0.1"),
    (dict(sigma=0.1, samples=0), ValueError, "randomized_mahalanobis: samples must be >= 1, got 0"),
    (dict(sigma=0.1, samples=2.5), TypeError, "randomized_mahalanobis: samples must be an int"),
    (dict(sigma=0.1), ValueError, "randomized_mahalanobis: samples is required when no noise is given"),
    (dict(sigma=0.1, samples=2, seed=-3), ValueError, r"randomized_mahalanobis: seed must be an int in \[0, 2\*\*63\)"),
    (dict(sigma=0.1, noise=torch.zeros(2, 2, 5, 4)), ValueError, r"randomized_mahalanobis: noise must be \[T, E, N, N\] = \[T, 2, 5, 5\]"),
    (dict(sigma=0.1, samples=3, noise=torch.zeros(2, 2, 5, 5)), ValueError, "randomized_mahalanobis: samples=3 but noise holds 2 samples"),
    (dict(sigma=0.1, noise=torch.zeros(2, 2, 5, 5, device="meta")), ValueError, "randomized_mahalanobis: noise must be on x's device"),
    (dict(sigma=0.1, samples=2, form="lower"), ValueError, "randomized_mahalanobis: form must be"),
])
def test_bad_randomized_input_names_the_argument(kw, exc, match):
    x, P, c = _good()
    with pytest.raises(exc, match=match):
        randomized_mahalanobis(x, P, c, **kw)


def test_compiled_kernels_check_shapes_too():
    """The C++ ops guard their own memory accesses (the Python checks come first normally)."""
    pytest.importorskip("pyens._C")
    x, P, c = _good()
    with pytest.raises(RuntimeError, match=r"mahalanobis: P must be \[E, N, N\]"):
        torch.ops.pyens_C.mahalanobis_fwd(x, P[:, :4], c, 1, 0.0)
    with pytest.raises(RuntimeError, match="randomized_mahalanobis: samples = 3 but noise has 2"):
        torch.ops.pyens_C.rmahalanobis_fwd(x, P, c, torch.zeros(2, 2, 5, 5), 0, 3, 0.1, 1, 0.0)


def test_backends_report_and_required_backends():
    from tests.conftest import REQUIRED

    report = pyens.ops.backends()
    assert report["mahalanobis"]["cpu"]["selected"] in ("cpu", "reference")
    usable = pyens.ops.available_backends("mahalanobis", "cpu")
    missing = sorted(REQUIRED - set(usable))
    assert not missing, f"required backends unavailable: {missing}: {report['mahalanobis']['cpu']['why_not']}"
    if not torch.cuda.is_available():
        x, P, c = _good()
        with use_backend("cuda"), pytest.raises(pyens.ops.BackendUnavailableError, match="backend 'cuda' was forced"):
            mahalanobis(x, P, c)


def test_close_pair_threshold_is_shared():
    """The Triton driver recomputes the same pairs as the compiled backends (csrc/mahalanobis.h)."""
    import re
    from pathlib import Path

    kernels = pytest.importorskip("pyens.kernels.mahalanobis")
    header = (Path(__file__).resolve().parents[1] / "csrc" / "mahalanobis.h").read_text()
    assert float(re.search(r"constexpr double kClose = ([0-9.]+);", header).group(1)) == kernels.CLOSE
