"""The GPU kernels on CUDA tensors (marked cuda: `pytest -m cuda`, bench/gpu_session.sh), and the
host-side parts of their fixes that the CPU can check.

Each test below names the defect of issue 19 it guards: the shared-memory opt-in of
csrc/lp_step.cu, scalars passed to Triton as float32, int64 offsets and grid limits, fp32
approximate sqrt/div, TF32 transforms, uncovered compute capabilities, FMA-contracted noise.
"""
import time

import pytest
import torch

from pyens.ops import mahalanobis, mahalanobis_noise, randomized_mahalanobis, selftest, use_backend
from pyens.ops.dispatch import OPS, forget_choices
from pyens.reference import mahalanobis as ref
from pyens.reference.lp_step import lp_rows as reference_rows
from tests.conftest import DEVICES, TOLERANCES, assert_close, backend_params, gpu_backend_params

GPU_LP = gpu_backend_params("lp_step")
GPU_DML = gpu_backend_params("mahalanobis")
TRITON_CPU = backend_params("mahalanobis", ("triton",))


def _kernel(op, backend):
    return OPS[op].kernels[backend].load()


# ---------------------------------------------------------------------------------------------
# the selftest on each device

@pytest.mark.parametrize("device", DEVICES)
def test_selftest_passes(device):
    """The full selftest on the GPU (every backend, dtype and case, the shared-memory windows
    included); on the CPU the quick subset of the cpu backend (tests/test_selftest.py runs the
    full one; Triton's interpreter would take a minute here)."""
    results = selftest.run(device, backend="cpu" if device == "cpu" else None, quick=device == "cpu")
    assert results, f"no backend to test on {device}"
    assert all(r.ok for r in results), selftest.format_table([r for r in results if not r.ok])


# ---------------------------------------------------------------------------------------------
# Triton scalars, grid limits (host side: checked on the CPU under the interpreter)

@pytest.mark.parametrize("backend", TRITON_CPU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_triton_scalars_reach_the_kernels_in_the_accumulation_dtype(backend, dtype, monkeypatch):
    """eps, scale and sigma as Python floats are float32 in a compiled kernel (the interpreter
    keeps float64, so only this can show it here): every float argument must be a tensor of
    the accumulation dtype."""
    km = pytest.importorskip("pyens.kernels.mahalanobis")
    seen = []
    real = km._launch

    def spy(kernel, grid, device, *args, **meta):
        seen.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), args))
        return real(kernel, grid, device, *args, **meta)

    monkeypatch.setattr(km, "_launch", spy)
    x, P, c = selftest.make_points(5, 2, 3, 4, "tril", dtype=dtype)
    d, ut, v = km.forward(x, P, c, ref.TRIL, 1e-12)
    km.backward(torch.ones_like(d), x, P, c, d, ut, v, ref.TRIL, 1e-12, [True, True, True])
    km.rforward(x, P, c, None, 3, 2, 0.3, ref.TRIL, 1e-12)
    names = {name for name, _ in seen}
    assert {"_distances_kernel", "_distances_backward_kernel", "_noise_kernel"} <= names, names
    for name, args in seen:
        assert not any(isinstance(a, float) for a in args), f"{name} got a Python float"
        scalars = [a for a in args if isinstance(a, torch.Tensor) and a.numel() == 1]
        assert scalars and all(a.dtype == dtype for a in scalars), (name, [a.dtype for a in scalars])


@pytest.mark.parametrize("backend", TRITON_CPU)
def test_triton_grid_limits_are_checked(backend):
    km = pytest.importorskip("pyens.kernels.mahalanobis")
    km._check_grid((10**6, 65535, 65535), "C")  # at the limit: fine
    with pytest.raises(ValueError, match=r"N = 9 needs 65536 programs along grid axis 1, more than CUDA's 65535"):
        km._check_grid((1, 65536, 1), "N = 9")
    with pytest.raises(ValueError, match=r"E \(members\) needs 65536 programs along grid axis 2"):
        km._check_grid((1, 1, 65536), "C")
    # through the op: one class past 65535 c-tiles is refused before any launch
    C = 65535 * 16 + 1
    x, P, c = torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, C, 1)
    with use_backend("triton"), pytest.raises(ValueError, match=f"C = {C} \\(classes\\) needs 65536 programs"):
        mahalanobis(x, P, c, form="diag")


# ---------------------------------------------------------------------------------------------
# on CUDA tensors

@pytest.mark.parametrize("backend", GPU_LP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_lp_rows_at_the_shared_memory_edges(backend, dtype):
    """csrc/lp_step.cu stages rows in dynamic shared memory; the opt-in above the 48 KiB default
    must count the kernel's static arrays, or rows just under it fail at launch (f32 step n =
    4022-4096, project 6032-6144, direction 12064-12288; f64 step 1990-2048, project 2984-3072)."""
    kernel = _kernel("lp_step", backend)
    rtol, atol = TOLERANCES[dtype]
    for n in selftest.SMEM_EDGES[dtype]:
        d, g, x = (t.cuda() for t in selftest.make_rows(3, n, dtype, n))
        for mode, norm in ((0, 1), (1, 2), (2, 1), (2, 2)):
            args = ([norm], [2.0 if norm == 1 else 10.0], [0.1], [20], 0.0, 1.0, True)
            got, flags = kernel(mode, d, g, x, *args)
            want, _ = reference_rows(mode, d.cpu().double(), g.cpu().double(), x.cpu().double(), *args)
            assert flags.item() == 0
            assert_close(got, want, rtol=rtol, atol=atol * 10, what=f"{backend} {dtype} n={n} mode={mode}")


@pytest.mark.parametrize("backend", gpu_backend_params("lp_step", ("triton",)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [32769, 65536])
def test_triton_longest_rows(backend, dtype, n, capsys):
    """MAX_N = 65536 holds ~128 values per thread: right, and its compile and run times printed
    (register spills show there)."""
    kernel = _kernel("lp_step", backend)
    d, g, x = (t.cuda() for t in selftest.make_rows(4, n, dtype, 1))
    args = ([2, 1, 0, 2], [10.0, 2.0, 0.3, 10.0], [0.8, 0.1, 0.01, 0.8], [20, 20, 20, 20], 0.0, 1.0, True)
    start = time.perf_counter()
    got, flags = kernel(2, d, g, x, *args)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    start = time.perf_counter()
    kernel(2, d, g, x, *args)
    torch.cuda.synchronize()
    with capsys.disabled():
        print(f"\ntriton lp_step n={n} {dtype}: first call (compile) {first:.2f} s, "
              f"then {1e3 * (time.perf_counter() - start):.2f} ms")
    want, _ = reference_rows(2, d.cpu().double(), g.cpu().double(), x.cpu().double(), *args)
    rtol, atol = TOLERANCES[dtype]
    assert flags.item() == 0
    assert_close(got, want, rtol=rtol, atol=atol * 10, what=f"triton n={n} {dtype}")


@pytest.mark.parametrize("backend", GPU_DML)
def test_randomized_draws_are_bit_identical_to_the_cpu(backend):
    """The perturbed factor F + sigma z rounds twice on every backend (no FMA): with N = 1 and
    x - c = 1 the randomized distance is |F + sigma z| exactly, so CPU and GPU must agree
    bitwise; E = 7 makes the per-sample size no multiple of 4 (samples start mid-counter), and
    T = 4 makes the mean's 1/T exact."""
    E, T = 7, 4
    P = torch.linspace(-0.9, 1.3, E).reshape(E, 1, 1)
    x, c = torch.ones(1, 1), torch.zeros(E, 1, 1)
    with use_backend("cpu"):
        want = randomized_mahalanobis(x, P, c, sigma=0.37, samples=T, seed=11, form="full", eps=0.0)
        want_noise = mahalanobis_noise(11, (T, E, 1, 1))
    with use_backend(backend):
        got = randomized_mahalanobis(x.cuda(), P.cuda(), c.cuda(), sigma=0.37, samples=T, seed=11, form="full",
                                     eps=0.0)
        noise = mahalanobis_noise(11, (T, E, 1, 1), device="cuda")
    assert torch.equal(noise.cpu(), want_noise)
    assert torch.equal(got.cpu(), want), (got.cpu() - want).abs().max()
    for shape in ((2, 3, 5, 5), (1, 1, 1, 3), (3, 2, 33, 33)):
        with use_backend(backend):
            got = mahalanobis_noise(2**62 + 7, shape, device="cuda")
        assert torch.equal(got.cpu(), ref.normal_noise(2**62 + 7, shape)), shape


@pytest.mark.parametrize("backend", GPU_DML)
@pytest.mark.parametrize("form", ["diag", "tril", "full"])
def test_randomized_float64_carries_float64_sigma(backend, form):
    """A float32 sigma (or 1/T) in a float64 kernel is off by ~1e-8 relative: 1e-9 catches it."""
    x, P, c = (t.cuda() for t in selftest.make_points(6, 2, 17, 18, form, seed=3))
    with use_backend(backend):
        got = randomized_mahalanobis(x, P, c, sigma=0.1, samples=3, seed=5, form=form)
    want = ref.rforward(x.cpu(), P.cpu(), c.cpu(), None, 5, 3, 0.1, ref.FORMS[form], 1e-12)
    assert_close(got, want, rtol=1e-9, atol=1e-9, what=f"{backend} {form} float64")


@pytest.mark.parametrize("backend", GPU_DML)
def test_float32_distance_error_in_ulps(backend):
    """The float32 distances' error against float64, in ulps (printed; the kernels use the
    round-to-nearest sqrt and division, the rest is the sums' rounding)."""
    x, P, c = (t.cuda() for t in selftest.make_points(64, 2, 33, 40, "tril", dtype=torch.float32, seed=9,
                                                      hit=False))
    with use_backend(backend):
        d = mahalanobis(x, P, c)
    want = ref.mahalanobis(x.cpu().double(), P.cpu().double(), c.cpu().double(), form=ref.TRIL)
    ulps = ((d.cpu().double() - want).abs() / torch.finfo(torch.float32).eps / want.abs()).max().item()
    print(f"\n{backend}: float32 distance error {ulps:.2f} ulp")
    assert ulps < 64


@pytest.mark.parametrize("backend", GPU_DML)
def test_tf32_transforms_error_is_bounded(backend):
    """The transforms are GEMMs, which follow torch's float32 matmul precision: TF32 under
    "high". The ops do not pin it; docs/mahalanobis.md gives this bound."""
    x, P, c = (t.cuda() for t in selftest.make_points(64, 2, 10, 96, "full", dtype=torch.float32, seed=4,
                                                      hit=False))
    want = ref.mahalanobis(x.cpu().double(), P.cpu().double(), c.cpu().double(), form=ref.FULL)
    old = torch.get_float32_matmul_precision()
    try:
        for precision, rtol in (("highest", 2e-5), ("high", 5e-3)):
            torch.set_float32_matmul_precision(precision)
            with use_backend(backend):
                d = mahalanobis(x, P, c, form="full")
            err = ((d.cpu().double() - want).abs() / want.abs()).max().item()
            print(f"\n{backend} {precision}: max relative error {err:.2e}")
            assert err < rtol, (precision, err)
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("backend", GPU_DML)
def test_grid_edges(backend):
    """C up to 65535 tiles of 16 runs; one more class is refused with the sizes named."""
    C = 65535 * 16
    x, P, c = torch.zeros(1, 1, device="cuda"), torch.ones(1, 1, device="cuda"), torch.zeros(1, C, 1, device="cuda")
    c[0, -1] = 2.0
    with use_backend(backend):
        d = mahalanobis(x, P, c, form="diag", eps=0.0)
        assert d[0, 0, -1].item() == 2.0 and d[0, 0, 0].item() == 0.0
        with pytest.raises((ValueError, RuntimeError), match="65535"):
            mahalanobis(x, P, torch.zeros(1, C + 1, 1, device="cuda"), form="diag")


@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_DML)
def test_offsets_past_two_to_the_31(backend):
    """ut [E, N, B] with E * N * B > 2^31: int32 offsets would wrap and read another member's
    values (~13 GB of GPU memory)."""
    E, N, B = 2, 1024, 2**20 + 8
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~40 GB of GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(B, N, device="cuda", generator=gen)
    P = torch.rand(E, N, device="cuda", generator=gen)
    c = torch.rand(E, 1, N, device="cuda", generator=gen)
    with use_backend(backend):
        d = mahalanobis(x, P, c, form="diag")
    rows = torch.tensor([0, B // 2, B - 2, B - 1])
    want = ref.mahalanobis(x[rows].cpu().double(), P.cpu().double(), c.cpu().double(), form=ref.DIAG)
    del x
    assert_close(d[rows.cuda()], want, rtol=2e-5, atol=2e-5, what=f"{backend} E*N*B > 2^31")


@pytest.mark.cuda
def test_uncovered_compute_capability_falls_back(monkeypatch):
    """A build without code for this device's architecture is not chosen: triton (or the
    reference) runs, and the reason names the capability."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device is visible to torch")
    from pyens.ops import dispatch

    info = dict(dispatch.build_info(), cuda=True, cuda_archs="35-real")
    monkeypatch.setattr(dispatch, "build_info", lambda: info)
    monkeypatch.setattr(dispatch, "compiled_extension",
                        lambda: (type("M", (), {"build_info": staticmethod(lambda: info)}), None))
    forget_choices()
    try:
        why = OPS["lp_step"].why_not("cuda", "cuda")
        assert why and "compute capability" in why and "TORCH_CUDA_ARCH_LIST" in why
        assert OPS["lp_step"].report("cuda")["selected"] != "cuda"
    finally:
        forget_choices()

