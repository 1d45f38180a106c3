"""pytest-benchmark suite of the lp step (``pyens.ops.lp_step``) against the field's eager peers.

Run (CPU; add ``--device cuda`` on a GPU machine)::

    python -m pytest bench/bench_lp_step.py --benchmark-only \
        --benchmark-json bench/results/cpu-<date>.json -q
    python -m bench.report bench/results/cpu-<date>.json

What is timed (float32, box [0, 1], k = 20, the papers' eps/alpha, Appendix C):

* ``test_lp_step``: one step on ``[B, n]`` rows for each shape x norm x provider.
  Providers are the pyens backends usable on the device
  (``pyens.ops.available_backends``; triton only on CUDA, the interpreter is not a
  benchmark) and ``peer`` (``bench/peers.py``: torchattacks' linf/l2 PGD, AutoAttack's
  sorted l1).  l2 is timed with both projections for pyens: ``sequential`` is the
  peer's own convention, ``exact`` the product's default.
* ``test_lp_step_members``: the MAT layout ``[B, 3, n]`` with norms (l1, l2, linf) in one
  launch; the peer loops over the members as the field does.
* ``test_lp_step_member_rows``: each member's rows alone (contiguous ``[B, n]``), so the
  report can compare the mixed launch with the sum of three single-norm launches.
* ``test_copy_bandwidth``: ``dst.copy_(src)`` moving as many bytes as one step.

Bytes moved by a step: 16 per element (read x, delta, grad; write delta), so
GB/s = ``extra_info["bytes"] / median``.  Inputs: x ~ U(0, 1), grad ~ N(0, 1), delta on
the eps sphere then clipped to the box (PGD's steady state: the step leaves the ball, so
every row needs its projection).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch

from bench import peers
from bench._env import device_name
from bench.conftest import bench_device
from pyens.papers import MEMBER_NORMS, NORMS, PAPER_ALPHA, PAPER_EPS
K = 20
BYTES_PER_ELEMENT = 16  # float32: read x, delta, grad; write delta
DTYPE = torch.float32

# The papers' hyperparameters (MAT paper, Appendix C: eps, alpha, k = 20).
HYPER = {name: {"eps": PAPER_EPS[d], "alpha": PAPER_ALPHA[d]} for name, d in (("mnist", "mnist"), ("cifar", "cifar10"))}
MAT_NORMS = MEMBER_NORMS  # member m of the MAT layout is attacked in MAT_NORMS[m]
PEER_PROJECTION = {"linf": "exact", "l2": "sequential", "l1": "exact"}


@dataclass(frozen=True)
class Shape:
    name: str
    data: str          # "mnist" | "cifar": which eps/alpha
    batch: int
    members: int       # 1: rows [B, n]; 3: MAT layout [B, 3, n]
    n: int

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.batch, self.n) if self.members == 1 else (self.batch, self.members, self.n)

    @property
    def numel(self) -> int:
        return self.batch * self.members * self.n

    @property
    def step_bytes(self) -> int:
        return BYTES_PER_ELEMENT * self.numel


ROW_SHAPES = (
    Shape("mnist-128x784", "mnist", 128, 1, 784),
    Shape("cifar-256x3072", "cifar", 256, 1, 3072),
    Shape("cifar-1024x3072", "cifar", 1024, 1, 3072),
)
MAT_SHAPES = (
    Shape("mat-mnist-128x3x784", "mnist", 128, 3, 784),
    Shape("mat-cifar-256x3x3072", "cifar", 256, 3, 3072),
)
SHAPES = {s.name: s for s in ROW_SHAPES + MAT_SHAPES}


# ----------------------------------------------------------------------------- providers
def _pyens_ops():
    try:
        import pyens.ops as ops
    except Exception as exc:  # noqa: BLE001 - any import failure means "no pyens providers"
        return None, f"pyens.ops is not importable: {type(exc).__name__}: {exc}"
    return ops, ""


def pyens_providers(device: str) -> list:
    """The pyens backends to time on ``device`` as pytest params (a skipped one if none)."""
    ops, why = _pyens_ops()
    if ops is None:
        return [pytest.param("pyens", marks=pytest.mark.skip(reason=why))]
    names = [str(b) for b in ops.available_backends("lp_step", device=device)]
    if device == "cpu":
        names = [b for b in names if b != "triton"]  # TRITON_INTERPRET=1 is not a benchmark
    return names


def pytest_generate_tests(metafunc):
    device = bench_device(metafunc.config)
    providers = pyens_providers(device) + ["peer"]

    def ident(p):
        return p.values[0] if hasattr(p, "values") else p

    if "step_case" in metafunc.fixturenames:
        cases = []
        for shape in ROW_SHAPES:
            for norm in NORMS:
                for prov in providers:
                    marks = getattr(prov, "marks", ())
                    name = ident(prov)
                    if name == "peer":
                        projs = [PEER_PROJECTION[norm]]
                    else:
                        projs = ["exact", "sequential"] if norm == "l2" else ["exact"]
                    for proj in projs:
                        cases.append(pytest.param((shape.name, norm, name, proj), marks=marks,
                                                  id=f"{shape.name}-{norm}-{name}-{proj}"))
        metafunc.parametrize("step_case", cases)
    if "member_case" in metafunc.fixturenames:
        cases = []
        for shape in MAT_SHAPES:
            for prov in providers:
                cases.append(pytest.param((shape.name, ident(prov)), marks=getattr(prov, "marks", ()),
                                          id=f"{shape.name}-{ident(prov)}"))
        metafunc.parametrize("member_case", cases)
    if "member_row_case" in metafunc.fixturenames:
        cases = []
        for shape in MAT_SHAPES:
            for m, norm in enumerate(MAT_NORMS):
                for prov in providers:
                    cases.append(pytest.param((shape.name, m, ident(prov)), marks=getattr(prov, "marks", ()),
                                              id=f"{shape.name}-m{m}-{norm}-{ident(prov)}"))
        metafunc.parametrize("member_row_case", cases)


# ----------------------------------------------------------------------------- inputs
def make_inputs(dims, norms, eps, device, seed=0):
    """``(delta, grad, x)`` float32 of shape ``dims``: ``[B, n]``, or ``[B, M, n]`` (dim 1: members).

    ``norms``/``eps`` are per member (length 1 for the row layout).  delta lies on each
    member's eps sphere, then is clipped to the box (so it stays inside the ball).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(dims, generator=gen, dtype=DTYPE)
    grad = torch.randn(dims, generator=gen, dtype=DTYPE)
    v = torch.randn(dims, generator=gen, dtype=DTYPE)
    members = 1 if len(dims) == 2 else dims[1]
    rows = v.reshape(dims[0], members, -1)
    delta = torch.empty_like(rows)
    for m in range(members):
        r, e = rows[:, m], float(eps[m])
        if norms[m] == "linf":
            d = e * torch.sign(r)
        else:
            p = 2 if norms[m] == "l2" else 1
            d = e * r / r.norm(p=p, dim=1, keepdim=True)
        delta[:, m] = d
    delta = delta.reshape(dims)
    delta = torch.clamp(x + delta, 0, 1) - x
    return tuple(t.to(device).contiguous() for t in (delta, grad, x))


def _device_name(device) -> str:
    return f"{device_name(torch.device(device))[:-1]}, {torch.get_num_threads()} threads)"


def _call(fn, device):
    """``fn`` followed by a device sync (CUDA work is asynchronous)."""
    if device != "cuda":
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    return synced


def run_benchmark(benchmark, fn, device, *, target_s=0.5, min_rounds=5, max_rounds=200):
    """Warm ``fn`` up (compile, autotune, caches), then time rounds of it.

    The number of rounds follows the cost of one call: about ``target_s`` of timed work,
    at least ``min_rounds`` (the sorted l1 peer at 1024x3072 takes most of a second on
    two cores), at most ``max_rounds``.  Calls well under 100 us are grouped into
    iterations so each round is long enough for the timer.
    """
    f = _call(fn, device)
    f()
    # Cost of one call: the fastest of a few (a single probe is at the mercy of a busy machine).
    once, spent = float("inf"), 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        out = f()
        dt = time.perf_counter() - t0
        once, spent = min(once, dt), spent + dt
        if spent > 0.25:
            break
    once = max(once, 1e-7)
    rounds = int(min(max(target_s / once, min_rounds), max_rounds))
    iterations = max(1, int(1e-4 / once))
    benchmark.pedantic(f, rounds=rounds, iterations=iterations, warmup_rounds=1)
    return out


def _info(benchmark, *, device, shape, group, norm, provider, projection, eps, alpha, nbytes):
    benchmark.group = f"{shape.name} {norm}" if group != "copy" else f"{shape.name} copy"
    benchmark.extra_info.update(
        device=device,
        device_name=_device_name(device),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        dtype=str(DTYPE).replace("torch.", ""),
        shape=shape.name,
        dims=list(shape.dims),
        group=group,
        norm=norm,
        provider=provider,
        projection=projection,
        eps=eps,
        alpha=alpha,
        k=K,
        bytes=nbytes,
        cpus=os.cpu_count(),
        loadavg_1m=round(os.getloadavg()[0], 2),  # a busy machine makes CPU timings noisy
    )


def _check(got, want, what):
    """Guard against timing a wrong result: pyens and peer must agree in the same convention."""
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 1e-4, f"{what}: pyens and peer differ by {err:.3e}"


# ----------------------------------------------------------------------------- benchmarks
def test_lp_step(benchmark, device, step_case):
    shape, norm, provider, projection = step_case
    shape = SHAPES[shape]
    hp = HYPER[shape.data]
    eps, alpha = hp["eps"][norm], hp["alpha"][norm]
    delta, grad, x = make_inputs(shape.dims, [norm], [eps], device)
    _info(benchmark, device=device, shape=shape, group="step", norm=norm, provider=provider,
          projection=projection, eps=eps, alpha=alpha, nbytes=shape.step_bytes)

    if provider == "peer":
        out = run_benchmark(benchmark, lambda: peers.peer_step(delta, grad, x, norm=norm, eps=eps,
                                                               alpha=alpha, k=K), device)
        return

    ops, _ = _pyens_ops()
    with ops.use_backend(provider):
        def fn():
            return ops.lp_step(delta, grad, x, norm=norm, eps=eps, alpha=alpha, k=K,
                               projection=projection)
        out = run_benchmark(benchmark, fn, device)
    if projection == PEER_PROJECTION[norm]:
        _check(out, peers.peer_step(delta, grad, x, norm=norm, eps=eps, alpha=alpha, k=K),
               f"{shape.name} {norm} {provider}")


def _mat_params(shape):
    hp = HYPER[shape.data]
    return (tuple(hp["eps"][n] for n in MAT_NORMS), tuple(hp["alpha"][n] for n in MAT_NORMS))


def test_lp_step_members(benchmark, device, member_case):
    """One launch over the MAT layout [B, 3, n], member m attacked in MAT_NORMS[m]."""
    shape, provider = member_case
    shape = SHAPES[shape]
    eps, alpha = _mat_params(shape)
    delta, grad, x = make_inputs(shape.dims, MAT_NORMS, eps, device)
    _info(benchmark, device=device, shape=shape, group="members", norm=",".join(MAT_NORMS),
          provider=provider, projection="exact" if provider != "peer" else "peer",
          eps=list(eps), alpha=list(alpha), nbytes=shape.step_bytes)

    if provider == "peer":
        def peer():  # the field: one step per member, stacked back into the layout
            return torch.stack([
                peers.peer_step(delta[:, m], grad[:, m], x[:, m], norm=MAT_NORMS[m], eps=eps[m],
                                alpha=alpha[m], k=K)
                for m in range(shape.members)], dim=1)
        run_benchmark(benchmark, peer, device)
        return

    ops, _ = _pyens_ops()
    with ops.use_backend(provider):
        def fn():
            return ops.lp_step(delta, grad, x, norm=MAT_NORMS, eps=eps, alpha=alpha, k=K,
                               members=len(MAT_NORMS))
        out = run_benchmark(benchmark, fn, device)
    for m, norm in enumerate(MAT_NORMS):
        if PEER_PROJECTION[norm] == "exact":
            want = peers.peer_step(delta[:, m], grad[:, m], x[:, m], norm=norm, eps=eps[m],
                                   alpha=alpha[m], k=K)
            _check(out[:, m], want, f"{shape.name} member {m} ({norm}) {provider}")


def test_lp_step_member_rows(benchmark, device, member_row_case):
    """Member m's rows of the MAT layout alone: one single-norm launch on contiguous [B, n]."""
    shape, m, provider = member_row_case
    shape = SHAPES[shape]
    eps, alpha = _mat_params(shape)
    delta, grad, x = make_inputs(shape.dims, MAT_NORMS, eps, device)
    delta, grad, x = (t[:, m].contiguous() for t in (delta, grad, x))
    norm = MAT_NORMS[m]
    _info(benchmark, device=device, shape=shape, group="member-rows", norm=norm, provider=provider,
          projection="exact" if provider != "peer" else PEER_PROJECTION[norm],
          eps=eps[m], alpha=alpha[m], nbytes=shape.step_bytes // shape.members)
    benchmark.extra_info["member"] = m

    if provider == "peer":
        run_benchmark(benchmark, lambda: peers.peer_step(delta, grad, x, norm=norm, eps=eps[m],
                                                         alpha=alpha[m], k=K), device)
        return

    ops, _ = _pyens_ops()
    with ops.use_backend(provider):
        def fn():
            return ops.lp_step(delta, grad, x, norm=norm, eps=eps[m], alpha=alpha[m], k=K)
        run_benchmark(benchmark, fn, device)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_copy_bandwidth(benchmark, device, shape):
    """``dst.copy_(src)`` moving one step's bytes: the memory roof a fused step can reach."""
    shape = SHAPES[shape]
    fn, moved = peers.copy_probe(shape.step_bytes, device)
    _info(benchmark, device=device, shape=shape, group="copy", norm="-", provider="copy",
          projection="-", eps=None, alpha=None, nbytes=moved)
    run_benchmark(benchmark, fn, "cpu")  # the probe syncs on CUDA itself
