"""Edge cases of the C++ CPU kernels (csrc/*.cpp) against pyens.reference.

Empty batches and empty rows, a single member, rows of length 1, odd sizes around the kernels'
tiles and chunks, k larger than the row, and NaN/inf rejection in every norm and mode: the
sizes where an index or a tile boundary is most easily off by one. `make sanitize` runs these
(with the op tests) under AddressSanitizer and UndefinedBehaviorSanitizer; every case checks
values against the float64 reference, not only that the call returns.
"""
import itertools

import pytest
import torch

from pyens.ops import lp_step, mahalanobis, mahalanobis_noise, randomized_mahalanobis, use_backend
from pyens.reference import mahalanobis as ref
from pyens.reference.lp_step import lp_rows as reference_rows
from tests.conftest import TOLERANCES, assert_close, backend_params
from tests.test_lp_step import L1, L2, LINF, make_rows, run_backend
from tests.test_mahalanobis import close, make, reference_grads, run

LP_CPU = backend_params("lp_step", ("cpu",))
MAHA_CPU = backend_params("mahalanobis", ("cpu",))
EPS = {LINF: 0.1, L2: 0.3, L1: 0.5}  # small enough that the projections bind
ALPHA = {LINF: 0.03, L2: 0.1, L1: 0.2}


# ---------------------------------------------------------------------------------------------
# lp_rows (csrc/lp_step.cpp), called directly: the public ops return early on empty inputs

def _lp_args(mode, rows, n, norms, dtype, seed, k=3, exact=True):
    d, g, x = make_rows(max(rows, 1), n, dtype, seed, scale=0.5)
    d, g, x = d[:rows], g[:rows], x[:rows]
    return (mode, d, g, x, norms, [EPS[c] for c in norms], [ALPHA[c] for c in norms], [k] * len(norms),
            0.0, 1.0, exact)


def _check_lp(backend, args, what):
    got, flags = run_backend(backend, *args)
    mode, d, g, x, *rest = args
    want, want_flags = reference_rows(mode, d.double(), g.double(), x.double(), *rest)
    assert flags.item() == 0 == want_flags.item(), what
    assert got.dtype == d.dtype and got.shape == d.shape, what
    rtol, atol = TOLERANCES[d.dtype]
    assert_close(got, want, rtol=rtol, atol=atol, what=what)
    return got, want


# (rows, n): empty batch, empty rows, one row of one value, rows of length 1, and odd lengths
# around the l1 top-k's 8-lane groups and 64-value chunks and the 256-value partial sums
LP_SHAPES = [(0, 5), (3, 0), (0, 0), (1, 1), (5, 1), (1, 3), (7, 13), (3, 63), (4, 65), (3, 257)]
MEMBERS = {"linf": [LINF], "l2": [L2], "l1": [L1], "mixed": [L1, L2, LINF]}


@pytest.mark.parametrize("backend", LP_CPU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("members", MEMBERS, ids=list(MEMBERS))
@pytest.mark.parametrize("shape", LP_SHAPES, ids=[f"{r}x{n}" for r, n in LP_SHAPES])
def test_lp_rows_odd_and_empty_shapes(backend, dtype, members, shape):
    rows, n = shape
    for mode, exact in itertools.product((0, 1, 2), (True, False)):
        args = _lp_args(mode, rows, n, MEMBERS[members], dtype, seed=rows * 31 + n + mode, exact=exact)
        _check_lp(backend, args, f"mode={mode} exact={exact} {members} {rows}x{n} {dtype}")


@pytest.mark.parametrize("backend", LP_CPU)
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 64, 65])
def test_l1_k_larger_than_the_row(backend, n):
    """k >= n (and k beyond int32, which the kernel clamps): every movable coordinate moves,
    each by alpha / (their count), exactly the reference's choice."""
    for k, mode in itertools.product((n, n + 1, 10 * n + 3, 2**31 - 1, 2**40), (1, 2)):
        args = _lp_args(mode, 6, n, [L1], torch.float64, seed=n + mode, k=k)
        got, want = _check_lp(backend, args, f"k={k} n={n} mode={mode}")
        if mode == 1:
            assert torch.equal(got != 0, want != 0)


@pytest.mark.parametrize("backend", LP_CPU)
def test_single_member_layouts(backend):
    """members=1 ([B, 1, ...]) equals the plain layout and the reference, down to one value."""
    for shape in ((1, 1, 1), (3, 1, 1), (2, 1, 5), (4, 1, 3, 3)):
        d, g, x = (t.reshape(shape) for t in make_rows(shape[0], int(torch.tensor(shape[1:]).prod()),
                                                       torch.float64, sum(shape), scale=0.5))
        for norm, code in (("linf", LINF), ("l2", L2), ("l1", L1)):
            kw = dict(norm=norm, eps=EPS[code], alpha=ALPHA[code], k=2)
            with use_backend(backend):
                one = lp_step(d, g, x, members=1, **kw)
                plain = lp_step(d.squeeze(1), g.squeeze(1), x.squeeze(1), **kw)
            want, _ = reference_rows(2, *(t.reshape(shape[0], -1) for t in (d, g, x)), [code], [EPS[code]],
                                     [ALPHA[code]], [2], 0.0, 1.0, True)
            assert_close(one.reshape(shape[0], -1), want, rtol=1e-9, atol=1e-9, what=f"{norm} {shape} members=1")
            assert torch.equal(one.squeeze(1), plain)


@pytest.mark.parametrize("backend", LP_CPU)
@pytest.mark.parametrize("norm", [LINF, L2, L1], ids=["linf", "l2", "l1"])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["project", "direction", "step"])
def test_non_finite_rejected_in_every_norm_and_mode(backend, norm, mode):
    """A NaN or infinity anywhere (first or last value, a row of another member, a row of one
    value) sets the flag of exactly the input the reference names; the public op raises."""
    for (rows, n), bad, value in itertools.product(((1, 1), (6, 13), (4, 65)), ("delta", "grad", "x"),
                                                   (float("nan"), float("inf"), float("-inf"))):
        for r, i in {(0, 0), (rows - 1, n - 1), (rows // 2, n // 2)}:
            args = list(_lp_args(mode, rows, n, [norm, LINF], torch.float32, seed=n + r))
            slot = {"delta": 1, "grad": 2, "x": 3}[bad]
            args[slot] = args[slot].clone()
            args[slot][r, i] = value
            _, flags = run_backend(backend, *args)
            _, want = reference_rows(*args)
            assert flags.item() == want.item(), f"{bad}[{r}, {i}] = {value}: flags {flags.item()} != {want.item()}"
            if mode == 2:
                assert want.item() == {"delta": 1, "grad": 2, "x": 4}[bad]
                d, g, x = args[1:4]
                code = {LINF: "linf", L2: "l2", L1: "l1"}[norm]
                with use_backend(backend), pytest.raises(ValueError, match=rf"lp_step: {bad} contains NaN or infinity"):
                    lp_step(d, g, x, norm=code, eps=EPS[norm], alpha=ALPHA[norm], k=3)


# ---------------------------------------------------------------------------------------------
# the distance map (csrc/mahalanobis.cpp)

# (B, E, C, N): single member and single center, rows of one feature, one sample, a partial
# 32-column tile after a full one, centers not a multiple of the 5-center tile, the GEMM
# expansion (N >= 32) with one member, and the split tril products (N >= 128, odd)
MAHA_SHAPES = [(1, 1, 1, 1), (3, 1, 1, 1), (1, 1, 1, 5), (33, 1, 1, 2), (31, 1, 6, 1), (65, 1, 7, 3),
               (5, 1, 2, 33), (1, 1, 1, 32), (3, 1, 2, 129)]
FORMS = ("diag", "tril", "full")


@pytest.mark.parametrize("backend", MAHA_CPU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-x", "member-x"])
@pytest.mark.parametrize("form", FORMS)
def test_mahalanobis_odd_and_single_shapes(backend, dtype, shared, form):
    for shape in MAHA_SHAPES:
        x, P, c = make(*shape, form, shared=shared, dtype=dtype, seed=sum(shape))
        w = torch.randn(shape[:3], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        got = run(backend, mahalanobis, x, P, c, weights=w, form=form)
        close(got, reference_grads(x, P, c, form, weights=w), dtype, f"{backend} {form} {shape}")


@pytest.mark.parametrize("backend", MAHA_CPU)
@pytest.mark.parametrize("form", FORMS)
def test_mahalanobis_empty_dimensions(backend, form):
    """No samples, no centers: empty distances and zero-size or zero gradients of the right shape."""
    for shape in ((0, 1, 3, 4), (0, 2, 1, 40), (4, 1, 0, 3), (5, 2, 0, 33)):
        for shared in (True, False):
            x, P, c = make(*shape, form, shared=shared, seed=1)
            got = run(backend, mahalanobis, x, P, c, form=form)
            want = reference_grads(x, P, c, form)
            close(got, want, torch.float64, f"{form} {shape}")
            assert got[0].shape == shape[:3]


@pytest.mark.parametrize("backend", MAHA_CPU)
@pytest.mark.parametrize("form", FORMS)
def test_randomized_odd_and_single_shapes(backend, form):
    for shape, samples in (((1, 1, 1, 1), 1), ((3, 1, 2, 5), 3), ((0, 1, 2, 3), 2), ((2, 1, 1, 33), 2),
                           ((4, 1, 0, 3), 1)):
        x, P, c = make(*shape, form, shared=shape[0] % 2 == 1, seed=sum(shape))
        kw = dict(form=form, sigma=0.4, samples=samples, seed=99)
        got = run(backend, randomized_mahalanobis, x, P, c, **kw)
        want = run("reference", randomized_mahalanobis, x, P, c, **kw)
        close(got, want, torch.float64, f"{form} {shape} T={samples}")


@pytest.mark.parametrize("backend", MAHA_CPU)
def test_noise_of_odd_sizes_is_bit_identical(backend):
    """Flat sizes that are not a multiple of a Philox counter's four values, and empty ones."""
    for shape in ((1,), (3,), (1, 1, 1, 1), (2, 1, 3, 3), (1, 1, 5, 5), (0, 2, 3, 3), (7, 1, 1, 1)):
        with use_backend(backend):
            got = mahalanobis_noise(5, shape)
        assert torch.equal(got, ref.normal_noise(5, shape)), shape


@pytest.mark.parametrize("backend", MAHA_CPU)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("N", [1, 7, 33])
def test_mahalanobis_nan_propagates_like_the_reference(backend, form, N):
    """The distance map does not reject NaN (docs): it reaches exactly the distances it enters,
    through the tiled difference form (N < 32) and the expansion (N >= 32) alike."""
    B, E, C = 35, 2, 6
    x, P, c = make(B, E, C, N, form, seed=N)
    x[33, N - 1] = float("nan")
    c[1, 5, 0] = float("nan")
    with use_backend(backend):
        got = mahalanobis(x, P, c, form=form)
    want = ref.mahalanobis(x, P, c, form=ref.FORMS[form], eps=1e-12)
    assert torch.isnan(want).any() and torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    assert_close(got[ok], want[ok], rtol=1e-9, atol=1e-9, what=f"{form} N={N}")
