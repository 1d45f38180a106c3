"""pytest-benchmark suite of the distance map layer (``pyens.ops.mahalanobis``, ``randomized_mahalanobis``).

Run (CPU; add ``--device cuda`` on a GPU machine)::

    python -m pytest bench/bench_mahalanobis.py --benchmark-only \\
        --benchmark-json bench/results/cpu-<date>-mahalanobis.json -q
    python -m bench.bench_mahalanobis bench/results/cpu-<date>-mahalanobis.json --markdown

What is timed (float32, ``form="tril"``, eps = 1e-12), forward alone and forward + backward
(gradients of x, P and centers of ``d.sum()``), per shape and provider:

* shapes: the papers' DMLs (DML paper, Table 1: E = 5 members, C = N = 10 for MNIST /
  CIFAR-10, 45 for RESISC-45, B = 256), a feature-space DML (N = 512, C = 100), and the
  randomized DML (eq. 5) with T = 5 and T = 20 samples at the MNIST size;
* providers: the pyens backends usable on the device (``available_backends``; triton only
  on CUDA, the interpreter is not a benchmark) and two eager formulations:
  ``eager`` -- the composite the layer is usually written as (broadcast difference
  ``[B, E, C, N]``, einsum with the factor, sqrt; for R-DML all T perturbed factors at once)
  and ``cdist`` -- the best eager formulation: transform by the factor (two matmuls), then
  ``torch.cdist`` on the transformed points (for R-DML batched over T).

Recorded per benchmark (``extra_info``): device, threads, shape, mode, provider, FLOPs of the
transform formulation (forward ``2 N^2 E (B + C) + 3 B E C N``, backward twice that, times T
for R-DML), and the bytes autograd saves for the backward (``saved_bytes``: R-DML's must not
grow with T).  The report (``python -m bench.bench_mahalanobis RESULTS.json``) gives medians,
GFLOP/s and the speedups over ``eager`` and ``cdist`` of the same shape and mode.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench._env import environment
from bench.bench_lp_step import _call, _device_name, _pyens_ops, run_benchmark
from bench.conftest import bench_device

DTYPE = torch.float32
EPS = 1e-12
SIGMA = 0.1
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    E: int
    C: int
    N: int
    T: int = 0  # samples of the randomized DML (0: the deterministic op)

    def flops(self, mode: str) -> float:
        fwd = 2 * self.N**2 * self.E * (self.B + self.C) + 3 * self.B * self.E * self.C * self.N
        return fwd * max(self.T, 1) * (3 if mode == "fwd+bwd" else 1)


SHAPES = {s.name: s for s in (
    Shape("paper-256x5x10x10", 256, 5, 10, 10),
    Shape("resisc-256x5x45x45", 256, 5, 45, 45),
    Shape("feature-256x5x100x512", 256, 5, 100, 512),
    Shape("rdml-T5-256x5x10x10", 256, 5, 10, 10, T=5),
    Shape("rdml-T20-256x5x10x10", 256, 5, 10, 10, T=20),
)}


# ----------------------------------------------------------------------------- eager peers
def eager(x, P, centers):
    """The composite: broadcast difference [B, E, C, N], einsum with tril(P), sqrt."""
    diff = x[:, None, None, :] - centers[None]
    y = torch.einsum("eij,becj->beci", torch.tril(P), diff)
    return torch.sqrt((y * y).sum(-1) + EPS)


def cdist(x, P, centers):
    """The best eager formulation: transform by the factor, then torch.cdist per member."""
    F = torch.tril(P)
    u = torch.matmul(F, x.t()).transpose(1, 2)        # [E, B, N]
    v = torch.matmul(centers, F.transpose(1, 2))      # [E, C, N]
    return torch.cdist(u, v).permute(1, 0, 2)         # [B, E, C]


def eager_randomized(x, P, centers, noise):
    """All T perturbed factors at once: a [T, B, E, C, N] tensor, so memory grows with T."""
    diff = x[:, None, None, :] - centers[None]
    y = torch.einsum("teij,becj->tbeci", torch.tril(P)[None] + SIGMA * noise, diff)
    return torch.sqrt((y * y).sum(-1) + EPS).mean(0)


def cdist_randomized(x, P, centers, noise):
    F = torch.tril(P)[None] + SIGMA * noise          # [T, E, N, N]
    u = torch.matmul(F, x.t()).transpose(-1, -2)      # [T, E, B, N]
    v = torch.matmul(centers, F.transpose(-1, -2))    # [T, E, C, N]
    return torch.cdist(u, v).mean(0).permute(1, 0, 2)


# ----------------------------------------------------------------------------- providers
def pyens_providers(device: str) -> list:
    """pyens backends to time: not triton on the CPU (TRITON_INTERPRET=1 is not a benchmark), not
    reference (it materialises [B, E, C, N], [T, ...] too: it is the eager composite again)."""
    ops, why = _pyens_ops()
    skipped = {"reference"} | ({"triton"} if device == "cpu" else set())
    return ([str(b) for b in ops.available_backends("mahalanobis", device=device) if b not in skipped]
            if ops is not None else [pytest.param("pyens", marks=pytest.mark.skip(reason=why))])


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    providers = pyens_providers(bench_device(metafunc.config)) + ["eager", "cdist"]
    cases = []
    for shape in SHAPES.values():
        for mode in MODES:
            for prov in providers:
                name = prov.values[0] if hasattr(prov, "values") else prov
                cases.append(pytest.param((shape.name, mode, name), marks=getattr(prov, "marks", ()),
                                          id=f"{shape.name}-{mode}-{name}"))
    metafunc.parametrize("case", cases)


def make_inputs(shape: Shape, device: str, seed: int = 0):
    """x [B, N], P [E, N, N] (near the identity), centers [E, C, N] and, for R-DML, noise [T, E, N, N]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.B, shape.N, generator=gen, dtype=DTYPE)
    P = torch.eye(shape.N, dtype=DTYPE) + torch.randn(shape.E, shape.N, shape.N, generator=gen, dtype=DTYPE) / shape.N**0.5
    c = torch.randn(shape.E, shape.C, shape.N, generator=gen, dtype=DTYPE)
    noise = torch.randn(max(shape.T, 1), shape.E, shape.N, shape.N, generator=gen, dtype=DTYPE)
    return tuple(t.to(device) for t in (x, P, c, noise))


def layer_fn(shape: Shape, provider: str, noise: torch.Tensor):
    """``f(x, P, centers) -> [B, E, C]`` for one provider (pyens: call it inside ``backend_forced``)."""
    if provider == "eager":
        return (lambda x, P, c: eager_randomized(x, P, c, noise)) if shape.T else eager
    if provider == "cdist":
        return (lambda x, P, c: cdist_randomized(x, P, c, noise)) if shape.T else cdist
    ops, _ = _pyens_ops()

    def fn(x, P, c):
        if shape.T:
            return ops.randomized_mahalanobis(x, P, c, sigma=SIGMA, samples=shape.T, seed=1)
        return ops.mahalanobis(x, P, c)

    return fn


def backend_forced(provider: str):
    """The pyens backend forced for the whole benchmark (as bench_lp_step.py does), not per call."""
    if provider in ("eager", "cdist"):
        return contextlib.nullcontext()
    return _pyens_ops()[0].use_backend(provider)


def saved_bytes(fn, inputs) -> int:
    """Bytes autograd saves for the backward of ``fn(*inputs)`` (excluding the inputs themselves)."""
    ids = {id(t) for t in inputs}
    total = []

    def pack(t):
        if id(t) not in ids:
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(total)


def _check(got, want, what):
    """Guard against timing a wrong result: every provider must agree (float32 tolerance)."""
    err = ((got - want).abs() / (1 + want.abs())).max().item()
    assert err <= 1e-3, f"{what}: provider and reference differ by {err:.3e}"


# ----------------------------------------------------------------------------- benchmark
def build(shape: Shape, mode: str, provider: str, device: str):
    """One provider's case: ``((x, P, centers), noise, fn, leaves, step)``, ``step`` the timed call.

    For R-DML the pyens draws come from the seed (``noise`` is then the seed's draws) and the
    peers get the same draws explicitly."""
    x, P, c, noise = make_inputs(shape, device)
    if shape.T and provider not in ("eager", "cdist"):
        noise = _pyens_ops()[0].mahalanobis_noise(1, (shape.T, shape.E, shape.N, shape.N), device=device)
    fn = layer_fn(shape, provider, noise)
    leaves = [t.clone().requires_grad_() for t in (x, P, c)]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(x, P, c)
    else:
        def step():
            for t in leaves:
                t.grad = None
            fn(*leaves).sum().backward()
            return leaves[0].grad
    return (x, P, c), noise, fn, leaves, step


def test_mahalanobis(benchmark, device, case):
    shape_name, mode, provider = case
    shape = SHAPES[shape_name]
    with backend_forced(provider):
        (x, P, c), noise, fn, leaves, step = build(shape, mode, provider, device)
        benchmark.group = f"{shape.name} {mode}"
        benchmark.extra_info.update(
            op="mahalanobis", device=device, device_name=_device_name(device), threads=torch.get_num_threads(),
            torch=torch.__version__, dtype=str(DTYPE).replace("torch.", ""), shape=shape.name,
            dims=dict(B=shape.B, E=shape.E, C=shape.C, N=shape.N, T=shape.T), mode=mode, provider=provider,
            flops=shape.flops(mode), saved_bytes=saved_bytes(fn, leaves), cpus=os.cpu_count(),
            loadavg_1m=round(os.getloadavg()[0], 2),  # a busy machine makes CPU timings noisy
        )
        # correctness guard (R-DML: on the same draws): pyens and the peers compute the same thing
        want = cdist_randomized(x, P, c, noise) if shape.T else eager(x.double(), P.double(), c.double()).float()
        _check(fn(x, P, c).detach(), want, f"{shape.name} {provider}")
        run_benchmark(benchmark, step, device, target_s=0.4, max_rounds=100)


# ----------------------------------------------------------------------------- report
_ORDER = {"cuda": 0, "triton": 1, "cpu": 2, "eager": 8, "cdist": 9}
_NOISY = 1.5


def records(data: dict) -> list[dict]:
    out = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        if info.get("op") != "mahalanobis":
            continue
        info.update(median=float(b["stats"]["median"]), min=float(b["stats"]["min"]), rounds=int(b["stats"]["rounds"]))
        out.append(info)
    return out


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def render(data: dict) -> str:
    recs = records(data)
    if not recs:
        return "No bench_mahalanobis.py results in this file.\n"
    first = recs[0]
    loads = [r["loadavg_1m"] for r in recs if r.get("loadavg_1m") is not None]
    lines = [f"# Mahalanobis distance map benchmark: {first['device']} ({first['device_name']})", "",
             f"Run {data.get('datetime', '?')}; torch {first['torch']}, {first['threads']} threads, dtype "
             f"{first['dtype']}, form tril. Median of each benchmark's rounds; GFLOP/s from the transform "
             "formulation's FLOPs; `x eager` and `x cdist` = that provider's median / this median (same shape "
             f"and mode, same run). † median over {_NOISY:g}x the fastest round: a disturbed timing. "
             "`saved` = bytes autograd keeps for the backward.", ""]
    if loads:
        lines += [f"1-minute load average while benchmarking: {min(loads):.2f} to {max(loads):.2f} on "
                  f"{first.get('cpus', '?')} CPUs.", ""]
    peer = {(r["shape"], r["mode"], r["provider"]): r["median"] for r in recs}
    order = list(SHAPES)
    rows = []
    for r in sorted(recs, key=lambda r: (order.index(r["shape"]) if r["shape"] in order else 99,
                                         MODES.index(r["mode"]), _ORDER.get(r["provider"], 5))):
        ratios = []
        for p in ("eager", "cdist"):
            m = peer.get((r["shape"], r["mode"], p))
            ratios.append(f"{m / r['median']:.2f}" if m else "-")
        noisy = " †" if r["median"] > _NOISY * r["min"] else ""
        rows.append([r["shape"], r["mode"], r["provider"], _ms(r["median"]) + noisy, _ms(r["min"]),
                     f"{r['flops'] / r['median'] / 1e9:.1f}", *ratios, f"{r['saved_bytes'] / 1e6:.2f} MB",
                     r["rounds"]])
    header = ["shape", "mode", "provider", "median (ms)", "min (ms)", "GFLOP/s", "x eager", "x cdist", "saved",
              "rounds"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join("---:" if h not in ("shape", "mode", "provider") else "---" for h in header) + " |")
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- interleaved
def interleaved(shape: Shape, mode: str, device: str, *, rounds: int = 60, block_s: float = 0.02,
                providers: list | None = None) -> dict:
    """Every provider timed in alternating blocks of about ``block_s``, ``rounds`` times.

    On a machine shared with other work the speed changes from second to second, and
    pytest-benchmark times one provider after the other (a second or more each), so a
    ratio of two of its medians can compare a slow phase with a fast one. Here each round
    times one block of every provider back to back (the order rotating from round to round),
    and the ratio is taken within the round: its median over the rounds is the side-by-side
    figure. ``providers`` (default: the pyens backends, eager and cdist) can leave out a peer
    whose calls would disturb the others (eager allocates 0.8 GB per call at the feature
    shape). Returns per-provider medians (seconds per call) and the ratios' quartiles.
    """
    import statistics

    providers = providers or [p for p in pyens_providers(device) if isinstance(p, str)] + ["eager", "cdist"]
    steps, calls = {}, {}
    for prov in providers:
        with backend_forced(prov):
            f = _call(build(shape, mode, prov, device)[-1], device)
            for _ in range(3):
                f()
            t0 = time.perf_counter()
            f()
            once = max(time.perf_counter() - t0, 1e-7)
        steps[prov], calls[prov] = f, max(1, int(block_s / once))
    per_call = {p: [] for p in providers}
    for r in range(rounds):
        order = providers[r % len(providers):] + providers[:r % len(providers)]
        for prov in order:
            with backend_forced(prov):
                f, n = steps[prov], calls[prov]
                t0 = time.perf_counter()
                for _ in range(n):
                    f()
                per_call[prov].append((time.perf_counter() - t0) / n)
    out = {"shape": shape.name, "mode": mode, "device": device, "device_name": _device_name(device),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": rounds,
           "calls_per_block": calls, "loadavg_1m": round(os.getloadavg()[0], 2),
           "median_s": {p: statistics.median(v) for p, v in per_call.items()}, "ratios": {},
           "env": environment(torch.device(device))}
    for prov in providers:
        if prov in ("eager", "cdist"):
            continue
        for peer in ("eager", "cdist"):
            if peer not in per_call:
                continue
            q = sorted(a / b for a, b in zip(per_call[peer], per_call[prov]))
            out["ratios"][f"{peer}/{prov}"] = {"median": statistics.median(q), "q1": q[len(q) // 4],
                                               "q3": q[(3 * len(q)) // 4], "min": q[0], "max": q[-1]}
    return out


def render_interleaved(res: dict) -> str:
    lines = [f"{res['shape']} {res['mode']} on {res['device_name']}: {res['rounds']} interleaved rounds "
             f"(load {res['loadavg_1m']})", "", "| provider | median per call (ms) |", "| --- | ---: |"]
    lines += [f"| {p} | {m * 1e3:.4g} |" for p, m in res["median_s"].items()]
    lines += ["", "| ratio (peer / pyens, per round) | median | quartiles | range |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {k} | {v['median']:.2f} | {v['q1']:.2f} - {v['q3']:.2f} | {v['min']:.2f} - {v['max']:.2f} |"
              for k, v in res["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import json

    ap = argparse.ArgumentParser(prog="python -m bench.bench_mahalanobis",
                                 description="Markdown report of a pytest-benchmark run, or an interleaved "
                                             "side-by-side measurement of one shape (--interleaved)")
    ap.add_argument("results", nargs="?", help="pytest-benchmark --benchmark-json file to render")
    ap.add_argument("--markdown", nargs="?", const="", default=None, metavar="PATH",
                    help="also write the Markdown to PATH (default: RESULTS with .md)")
    ap.add_argument("--interleaved", action="store_true", help="time the providers in alternating blocks")
    ap.add_argument("--shape", default="paper-256x5x10x10", choices=sorted(SHAPES))
    ap.add_argument("--mode", default="fwd+bwd", choices=MODES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--block-s", type=float, default=0.02, help="seconds of calls per provider and round")
    ap.add_argument("--providers", help="comma-separated, e.g. cpu,cdist (default: every provider)")
    ap.add_argument("--json", metavar="PATH", help="with --interleaved: write the result as JSON to PATH")
    args = ap.parse_args(argv)
    if args.interleaved:
        res = interleaved(SHAPES[args.shape], args.mode, args.device, rounds=args.rounds, block_s=args.block_s,
                          providers=args.providers.split(",") if args.providers else None)
        text = render_interleaved(res)
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
            Path(args.json).with_suffix(".md").write_text(text)
        return 0
    if args.results is None:
        ap.error("give a results JSON file, or --interleaved")
    with open(args.results) as f:
        text = render(json.load(f))
    print(text)
    if args.markdown is not None:
        path = Path(args.markdown) if args.markdown else Path(args.results).with_suffix(".md")
        path.write_text(text)
        print(f"(written to {path})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
