"""``pyens selftest``: every op on every available backend against the float64 reference.

No CUDA kernel of pyens can be run where it is developed, so each backend proves itself on
the machine that uses it. :func:`run` checks the forward and the backward of every op, in
each dtype the backend takes, on a fixed set of cases (odd sizes, the member layout
``[B, M, ...]``, rows on the box bounds, zero-gradient rows, l1 top-k ties, ``k`` longer than
the row, Mahalanobis close pairs and every form, the randomized op's draws), with the
tolerances the test suite uses (:data:`TOLERANCES`). The ``quick`` subset is what dispatch
runs the first time a backend serves an op in a process (:func:`first_use_check`); its result
is cached on disk per backend, op, device, build and torch version, so a later process reads
a small JSON file instead.

Half inputs (float16, bfloat16) are computed in float32 by every backend (docs/ops.md,
"Dtypes"): they are compared with the reference in float32 on the same (upcast) values.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import _disable_current_modes

# (rtol, atol) per dtype on values of order 1 (the suite scales atol by the values' size).
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Backends dispatch checks on first use, per device type. The reference is the yardstick;
# Triton on CPU tensors is its interpreter, a correctness tool that is only ever forced.
FIRST_USE_CHECKED = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
CACHE_VERSION = 1  # bump when the cases change: older cached verdicts are then ignored


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class Result:
    """One (op, backend, dtype, case) row of the table."""

    op: str
    backend: str
    device: str
    dtype: str
    case: str
    max_err: float  # the largest |got - want| of the outputs the case compares
    ok: bool
    detail: str = ""  # the first failing output and where, or the exception


# ---------------------------------------------------------------------------------------------
# inputs (the test suite builds its inputs with these too)

def make_rows(rows: int, n: int, dtype: torch.dtype, seed: int, scale: float = 0.3):
    """``(delta, grad, x)`` ``[rows, n]`` with the hard cases built in: rows at the box bounds, a
    zero gradient, ties in the l1 top-k."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, n, generator=gen, dtype=torch.float64)
    x[0] = 0.0                              # every coordinate at lo
    if rows > 1:
        x[1, : max(1, n // 2)] = 1.0        # half the coordinates at hi
    d = torch.randn(rows, n, generator=gen, dtype=torch.float64) * scale
    g = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    if rows > 2:
        g[2] = 0.0                          # zero-gradient row
    if rows > 3:
        g[3] = g[3].round(decimals=1)       # many equal |g|: ties in the l1 top-k
    return d.to(dtype), g.to(dtype), x.to(dtype)


def make_points(B: int, E: int, C: int, N: int, form: str, *, shared: bool = True,
                dtype: torch.dtype = torch.float64, seed: int = 0, hit: bool = True):
    """``(x, P, centers)`` of the Mahalanobis ops: ``x`` ``[B, N]`` (``shared``) or ``[B, E, N]``,
    ``P`` ``[E, N]`` (diag) or ``[E, N, N]``, centers ``[E, C, N]``; with ``hit`` one sample sits
    exactly on one center (d = sqrt(eps) there)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((B, N) if shared else (B, E, N), generator=gen, dtype=torch.float64)
    P = torch.randn((E, N) if form == "diag" else (E, N, N), generator=gen, dtype=torch.float64) / math.sqrt(N)
    if form != "diag":
        P += torch.eye(N, dtype=torch.float64)
    c = torch.randn(E, C, N, generator=gen, dtype=torch.float64)
    if hit and B > 1 and C > 1:
        c[E - 1, C - 1] = x[1] if shared else x[1, E - 1]
    return x.to(dtype), P.to(dtype), c.to(dtype)


# ---------------------------------------------------------------------------------------------
# comparison

class _Mismatch(Exception):
    pass


class _Checker:
    """Collects the comparisons of one case: the largest error and the first failure."""

    def __init__(self):
        self.max_err = 0.0
        self.failure = ""

    def close(self, what: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
        got, want = got.detach().double().cpu(), want.detach().double().cpu()
        if got.shape != want.shape:
            self._fail(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}", math.inf)
            return
        if got.numel() == 0:
            return
        err = (got - want).abs()
        err = torch.where(torch.isnan(got) & torch.isnan(want), torch.zeros_like(err), err)
        err = torch.nan_to_num(err, nan=math.inf)
        worst = err.max().item()
        self.max_err = max(self.max_err, worst)
        bad = err > atol + rtol * want.abs()
        if bad.any():
            i = tuple(bad.nonzero()[0].tolist())
            self._fail(f"{what}: {int(bad.sum())} of {bad.numel()} values differ (max err {worst:.3g}); "
                       f"at {i} got {got[i].item():.9g}, want {want[i].item():.9g}", worst)

    def equal(self, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        """Bit-identical values (the draws, the l1 selection)."""
        got, want = got.detach().cpu(), want.detach().cpu()
        if got.shape != want.shape or got.dtype != want.dtype:
            self._fail(f"{what}: {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}", math.inf)
            return
        if not torch.equal(got, want):
            diff = got != want
            i = tuple(diff.nonzero()[0].tolist())
            err = (got.double() - want.double()).abs().max().item()
            self.max_err = max(self.max_err, err)
            self._fail(f"{what}: {int(diff.sum())} of {diff.numel()} values are not identical; "
                       f"at {i} got {got[i].item()!r}, want {want[i].item()!r}", err)

    def _fail(self, message: str, err: float) -> None:
        self.max_err = max(self.max_err, err)
        if not self.failure:
            self.failure = message


def _scaled_atol(atol: float, want: torch.Tensor) -> float:
    return atol * max(1.0, want.abs().max().item()) if want.numel() else atol


# ---------------------------------------------------------------------------------------------
# cases

@dataclass(frozen=True)
class Case:
    op: str
    name: str
    quick: bool
    check: Callable  # check(kernel, device, dtype, checker)
    devices: tuple = ("cpu", "cuda")
    dtypes: tuple = DTYPES
    backends: tuple | None = None  # None: every backend


LINF, L2, L1 = 0, 1, 2
_PAPER = {LINF: (0.3, 0.01), L2: (2.0, 0.1), L1: (10.0, 0.8)}  # MNIST eps, alpha (MAT, Appendix C)


def _ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _lp_case(n: int, rows: int, norms: list[int], *, k=None, modes=(0, 1, 2), exacts=(True, False), seed=0,
             scale=0.3):
    """Every mode in ``modes``, with the exact and/or sequential projection, on ``rows`` rows of
    ``n`` where row ``r`` is member ``r % M`` (the member layout [B, M, n] flattened)."""
    from pyens.reference.lp_step import lp_rows as reference

    m = len(norms)
    eps = [_PAPER[c][0] for c in norms]
    alpha = [_PAPER[c][1] for c in norms]
    ks = list(k) if k is not None else [20] * m

    def check(kernel, device, dtype, chk: _Checker):
        d, g, x = make_rows(rows, n, dtype, seed, scale)
        rtol, atol = TOLERANCES[dtype]
        rd = _ref_dtype(dtype)
        for mode in modes:
            for exact in (exacts if mode != 1 else (True,)):
                args = (norms, eps, alpha, ks, 0.0, 1.0, exact)
                got, flags = kernel(mode, d.to(device), g.to(device), x.to(device), *args)
                want, _ = reference(mode, d.to(rd), g.to(rd), x.to(rd), *args)
                what = f"mode={('project', 'direction', 'step')[mode]} exact={exact}"
                if int(flags.item()) != 0:
                    chk._fail(f"{what}: finite inputs flagged as non-finite ({int(flags.item())})", math.inf)
                scale_ = max(1.0, max(eps)) if mode != 1 else 1.0
                chk.close(what, got, want.to(dtype) if dtype != rd else want, rtol, atol * scale_)
                if mode == 1 and L1 in norms:  # a discrete selection: the same coordinates
                    chk.equal(f"{what} l1 selection", (got != 0).cpu(), (want != 0))

    return check


def _maha_case(B, E, C, N, *, shared: bool, forms=("diag", "tril", "full"), seed=0, near: bool = True):
    """Forward and backward of :func:`mahalanobis` for every form, with a sample on a center
    and (``near``) samples a hair from centers: the close pairs that leave the fast path."""
    from pyens.reference import mahalanobis as ref

    def check(kernel, device, dtype, chk: _Checker):
        rtol, atol = TOLERANCES[dtype]
        rd = _ref_dtype(dtype)
        for form in forms:
            code = ref.FORMS[form]
            x, P, c = make_points(B, E, C, N, form, shared=shared, seed=seed + code)
            if near and B > 2 and C > 1:
                gen = torch.Generator().manual_seed(seed + 99)
                for e in range(E):
                    b, cc = (2 + e) % B, e % C
                    c[e, cc] = (x[b] if shared else x[b, e]) + 1e-4 * torch.randn(N, generator=gen, dtype=torch.float64)
            x, P, c = (t.to(dtype) for t in (x, P, c))
            w = torch.randn(B, E, C, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
            d, ut, v = kernel.forward(x.to(device), P.to(device), c.to(device), code, 1e-12)
            grads = kernel.backward(w.to(d.dtype).to(device), x.to(device), P.to(device), c.to(device), d, ut, v,
                                    code, 1e-12, [True, True, True])
            xr, Pr, cr = (t.to(rd) for t in (x, P, c))
            want_d = ref.forward(xr, Pr, cr, code, 1e-12)[0]
            want = ref.backward(w.to(rd), xr, Pr, cr, None, None, None, code, 1e-12, [True, True, True])
            chk.close(f"{form} d", d, want_d, rtol, _scaled_atol(atol, want_d))
            for name, g, wg in zip(("dx", "dP", "dcenters"), grads, want):
                chk.close(f"{form} {name}", g, wg, rtol, _scaled_atol(atol, wg))

    return check


def _rmaha_case(B, E, C, N, *, shared: bool, forms=("diag", "tril", "full"), samples=2, sigma=0.4,
                seed=0, explicit: bool = False):
    """Forward and backward of the randomized op for every form from a seed (the draws are the
    same on every backend) or from explicit noise."""
    from pyens.reference import mahalanobis as ref

    def check(kernel, device, dtype, chk: _Checker):
        rtol, atol = TOLERANCES[dtype]
        rd = _ref_dtype(dtype)
        for form in forms:
            code = ref.FORMS[form]
            x, P, c = make_points(B, E, C, N, form, shared=shared, dtype=dtype, seed=seed + code)
            noise = None
            if explicit:
                gen = torch.Generator().manual_seed(seed)
                noise = torch.randn(samples, E, N, N, generator=gen, dtype=torch.float64)
            w = torch.randn(B, E, C, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
            args = (samples, sigma, code, 1e-12)
            dev = [t.to(device) for t in (x, P, c)]
            dn = None if noise is None else noise.to(dtype if dtype in (torch.float32, torch.float64)
                                                     else torch.float32).to(device)
            d = kernel.rforward(*dev, dn, 77 + seed, *args)
            grads = kernel.rbackward(w.to(d.dtype).to(device), *dev, dn, 77 + seed, *args, [True, True, True])
            xr, Pr, cr = (t.to(rd) for t in (x, P, c))
            rn = None if dn is None else dn.cpu().to(rd)
            want_d = ref.rforward(xr, Pr, cr, rn, 77 + seed, *args)
            want = ref.rbackward(w.to(rd), xr, Pr, cr, rn, 77 + seed, *args, [True, True, True])
            chk.close(f"{form} d", d, want_d, rtol, _scaled_atol(atol, want_d))
            for name, g, wg in zip(("dx", "dP", "dcenters"), grads, want):
                chk.close(f"{form} {name}", g, wg, rtol, _scaled_atol(atol, wg))

    return check


def _noise_case(shape, seeds=(0, 12345, 2**62 + 7)):
    """The draws of a seed: bit-identical to the reference's (float32 on every backend)."""
    from pyens.reference import mahalanobis as ref

    def check(kernel, device, dtype, chk: _Checker):
        like = torch.empty(0, device=device)
        for seed in seeds:
            chk.equal(f"seed={seed} shape={tuple(shape)}", kernel.noise(like, seed, list(shape)),
                      ref.normal_noise(seed, shape))

    return check


# The CUDA lp kernel stages rows in dynamic shared memory up to the device's opt-in limit less
# its static arrays; rows at the edges of the 48 KiB default (csrc/lp_step.cu) must run too.
SMEM_EDGES = {torch.float32: (4021, 4022, 4096, 6031, 6032, 6144, 12063, 12064, 12288),
              torch.float64: (1989, 1990, 2048, 2983, 2984, 3072)}


def _smem_case():
    def check(kernel, device, dtype, chk: _Checker):
        for n in SMEM_EDGES[dtype]:
            for norms, modes in (([L2], (0, 2)), ([L1], (0, 1, 2))):
                sub = _Checker()
                _lp_case(n, 2, norms, modes=modes, seed=n)(kernel, device, dtype, sub)
                chk.max_err = max(chk.max_err, sub.max_err)
                if sub.failure:
                    chk._fail(f"n={n}: {sub.failure}", sub.max_err)

    return check


_F32_F64 = (torch.float32, torch.float64)
# The quick subset keeps to one row length and the exact projection: each (dtype, mode, exact,
# block) is one Triton compile on first use. Half inputs share the float32 arithmetic and take
# only the quick cases.
CASES: tuple[Case, ...] = (
    Case("lp_step", "odd n=97, members l1/l2/linf, bounds, zero grad, ties", True,
         _lp_case(97, 6, [L1, L2, LINF], k=[5, 20, 20], exacts=(True,), seed=3)),
    Case("lp_step", "k > n (k=200, n=97)", True, _lp_case(97, 4, [L1], k=[200], modes=(1, 2), exacts=(True,), seed=2)),
    Case("lp_step", "odd n=7, members, exact and sequential", False,
         _lp_case(7, 6, [L1, L2, LINF], k=[3, 20, 20], seed=1), dtypes=_F32_F64),
    Case("lp_step", "n=784 (MNIST), every norm, exact and sequential", False,
         _lp_case(784, 6, [L1, L2, LINF], seed=4), dtypes=_F32_F64),
    Case("lp_step", "n=3073, large step", False,
         _lp_case(3073, 4, [L2, L1], k=[20, 3073], modes=(0, 2), seed=5, scale=2.0), dtypes=_F32_F64),
    Case("lp_step", "n=1, k > n", False, _lp_case(1, 6, [L1, L2, LINF], k=[4, 4, 4], seed=6), dtypes=_F32_F64),
    Case("lp_step", "shared-memory windows (n at the 48 KiB edges)", False, _smem_case(), devices=("cuda",),
         dtypes=_F32_F64, backends=("cuda",)),
    Case("mahalanobis", "every form, shared x, on/near centers", True,
         _maha_case(5, 2, 3, 6, shared=True, seed=10)),
    Case("mahalanobis", "every form, member x [B, E, N], on/near centers", True,
         _maha_case(5, 2, 3, 6, shared=False, seed=20)),
    Case("mahalanobis", "randomized, seed, every form (E*N*N not a multiple of 4)", True,
         _rmaha_case(3, 2, 3, 5, shared=True, seed=30)),
    Case("mahalanobis", "noise draws (Philox, Box-Muller)", True, _noise_case((2, 2, 5, 5), seeds=(7, 2**62 + 7)),
         dtypes=(torch.float32,)),
    Case("mahalanobis", "several tiles: B=37, C=19, N=35, member x", False,
         _maha_case(37, 2, 19, 35, shared=False, seed=40)),
    Case("mahalanobis", "several tiles: B=33, C=17, N=67, shared x", False,
         _maha_case(33, 3, 17, 67, shared=True, seed=50)),
    Case("mahalanobis", "randomized, explicit noise, member x, every form", False,
         _rmaha_case(6, 2, 4, 5, shared=False, samples=3, seed=60, explicit=True)),
    Case("mahalanobis", "randomized, seed, several tiles", False,
         _rmaha_case(18, 2, 17, 19, shared=True, samples=2, seed=70)),
    Case("mahalanobis", "noise draws, odd sizes", False, _noise_case((3, 3, 7, 7)), dtypes=(torch.float32,)),
)


# ---------------------------------------------------------------------------------------------
# running

def _ops():
    import pyens.ops  # noqa: F401  registers every op
    from pyens.ops.dispatch import OPS

    return OPS


def backends_for(device: torch.device, backend: str | None = None) -> list[str]:
    """The backends the selftest runs on ``device``: every available one but the reference."""
    from pyens.ops.dispatch import BACKENDS

    ops = _ops()
    names = [backend] if backend else [b for b in BACKENDS if b != "reference"]
    return [b for b in names if any(op.why_not(b, device.type) is None for op in ops.values())]


def run_cases(op_name: str, backend: str, device: torch.device, *, quick: bool,
              dtypes: Iterable[torch.dtype] | None = None) -> Iterator[Result]:
    """Run the cases of one op on one backend; yields a :class:`Result` per case and dtype."""
    op = _ops()[op_name]
    kernel_spec = op.kernels.get(backend)
    if kernel_spec is None:
        return
    try:
        kernel = kernel_spec.load()
    except Exception as exc:  # noqa: BLE001 - a backend that cannot load fails every case
        yield Result(op_name, backend, str(device), "-", "load the kernels", math.inf, False,
                     f"raised {exc.__class__.__name__}: {exc}")
        return
    # The kernels are checked at full float32 precision, whatever the caller chose for its own
    # GEMMs (TF32 under "high" would fail float32 cases on every backend alike).
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield from _run_cases(op, op_name, backend, kernel, device, quick, dtypes)
    finally:
        torch.set_float32_matmul_precision(precision)


def _run_cases(op, op_name, backend, kernel, device, quick, dtypes):
    for dtype in (dtypes or DTYPES):
        if op.why_not(backend, device.type, dtype) is not None:
            continue
        for case in CASES:
            if case.op != op_name or (quick and not case.quick) or device.type not in case.devices \
                    or dtype not in case.dtypes or (case.backends is not None and backend not in case.backends):
                continue
            chk = _Checker()
            try:
                case.check(kernel, device, dtype, chk)
            except Exception as exc:  # noqa: BLE001 - a crashing kernel is a failed case, reported
                first_line = (str(exc).strip().splitlines() or [""])[0]
                chk._fail(f"raised {exc.__class__.__name__}: {first_line}", math.inf)
            yield Result(op_name, backend, str(device), dtype_name(dtype), case.name, chk.max_err,
                         not chk.failure, chk.failure)


def run(device: str | torch.device = "cpu", backend: str | None = None, quick: bool = False,
        ops: Iterable[str] | None = None) -> list[Result]:
    """Every case of every op on every available backend of ``device`` (or only ``backend``).

    Raises ValueError for an unknown backend, or one that cannot run on ``device`` at all.
    """
    from pyens.ops.dispatch import BACKENDS

    device = torch.device(device)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': no CUDA device is visible to torch")
    names = backends_for(device, backend)
    if backend is not None and not names:
        why = {name: op.why_not(backend, device.type) for name, op in _ops().items()}
        raise ValueError(f"backend {backend!r} cannot run on {device.type}: "
                         + "; ".join(f"{k}: {v}" for k, v in why.items()))
    out = []
    for b in names:
        for op_name in (ops or _ops()):
            out.extend(run_cases(op_name, b, device, quick=quick))
    return out


def format_table(results: list[Result]) -> str:
    head = ("op", "backend", "dtype", "case", "max error", "pass")
    rows = [(r.op, r.backend, r.dtype, r.case, f"{r.max_err:.2e}", "ok" if r.ok else "FAIL") for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        if not r.ok:
            lines.append(f"FAIL {r.op} {r.backend} {r.dtype} [{r.case}]: {r.detail}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# first use: the quick subset, cached on disk

def cache_dir() -> Path:
    """``$PYENS_CACHE_DIR``, else the user's cache directory (XDG on Linux) + ``/pyens``."""
    env = os.environ.get("PYENS_CACHE_DIR")
    if env:
        return Path(env)
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "pyens" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "pyens"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyens"


def file_identity(path: str | None) -> str:
    """``name:size:mtime`` of a built file (``"missing"`` without one): a rebuild changes it."""
    if not path or not os.path.exists(path):
        return "missing"
    st = os.stat(path)
    return f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}"


def build_key(backend: str) -> str:
    """What the backend's code is: pyens' version, and the compiled extension's file (a rebuild
    changes it) or the Triton kernels' sources and Triton's version."""
    import pyens

    parts = [f"pyens {pyens.__version__}"]
    if backend in ("cpu", "cuda"):
        from pyens.ops.dispatch import compiled_extension

        mod, _ = compiled_extension()
        parts.append(file_identity(getattr(mod, "__file__", None)))
    elif backend == "triton":
        import triton

        import pyens.kernels as kernels

        src = hashlib.sha256()
        for f in sorted(Path(kernels.__file__).parent.glob("*.py")):
            src.update(f.read_bytes())
        parts += [f"triton {triton.__version__}", src.hexdigest()[:16]]
    return "; ".join(parts)


def device_key(device: torch.device) -> tuple[str, str]:
    """(device name, compute capability) — the capability is empty on the CPU."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return torch.cuda.get_device_name(index), f"{major}.{minor}"
    return _cpu_name(), ""


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    """The CPU model: the CPU kernels pick AVX2 / AVX-512 code at run time, so a verdict holds
    for one model. /proc/cpuinfo where there is one (``platform.processor()`` runs ``uname -p``
    on Linux, ~5 ms)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"cpu {platform.machine()} {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"cpu {platform.machine()} {platform.processor() or ''}".strip()


def cache_key(op: str, backend: str, device: torch.device) -> dict:
    name, cc = device_key(device)
    return {"version": CACHE_VERSION, "op": op, "backend": backend, "device": name, "capability": cc,
            "build": build_key(backend), "torch": torch.__version__, "torch_cuda": torch.version.cuda or ""}


def _cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / f"selftest-{key['op']}-{key['backend']}-{digest}.json"


def read_cached(key: dict) -> dict | None:
    """The cached verdict for ``key`` (None when there is none, or it is unreadable or stale)."""
    try:
        data = json.loads(_cache_path(key).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def write_cached(key: dict, verdict: dict) -> None:
    """Atomically (parallel processes may check at once); an unwritable cache is not an error."""
    from pyens.atomic_files import atomic_write_text

    path = _cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps({"key": key, **verdict}, indent=1), path)
    except OSError:
        pass


def first_use_check(op: str, backend: str, device: torch.device) -> dict:
    """The quick subset of ``op`` on ``backend`` and ``device``, read from the cache or run (and
    cached). Returns ``{"ok": bool, "failed": "dtype [case]: detail" | "", "seconds": float,
    "cached": bool}``."""
    key = cache_key(op, backend, device)
    hit = read_cached(key)
    if hit is not None:
        return {"ok": bool(hit.get("ok")), "failed": hit.get("failed", ""), "seconds": hit.get("seconds", 0.0),
                "cached": True}
    start = time.perf_counter()
    failed = ""
    # The caller's state must neither leak in (inference mode forbids the reference's autograd)
    # nor out (the check's own warnings are not the caller's); no global RNG is drawn from.
    # Nor may the caller's tensor modes: a first call under FakeTensorMode, a FlopCounterMode or
    # `with torch.device("meta")` would otherwise run the cases on fake tensors, fail, and cache
    # that failure on disk for every later process.
    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings(), \
            _disable_current_modes(), torch._C.DisableTorchFunction():
        warnings.simplefilter("ignore")
        for r in run_cases(op, backend, device, quick=True, dtypes=(torch.float32, torch.float64)):
            if not r.ok:
                failed = f"{r.dtype} [{r.case}]: {r.detail}"
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    verdict = {"ok": not failed, "failed": failed, "seconds": round(time.perf_counter() - start, 4),
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_cached(key, verdict)
    return {**verdict, "cached": False}
