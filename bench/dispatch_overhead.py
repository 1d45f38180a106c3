"""What an eager call pays through the registered ``torch.library`` op instead of the fast path.

Usage::

    OMP_NUM_THREADS=1 python -m bench.dispatch_overhead --rounds 21 \
        --json bench/results/cpu-<date>-dispatch-overhead.json

Every pyens op is one :class:`pyens.ops.dispatch.RegisteredOp`: under ``torch.compile`` (and
inside ``through_registered_ops()``) a call goes through the registered op, in eager mode it
takes the fast path (the same implementation, and for a differentiable op an
``autograd.Function`` built from the op's own ``setup_context`` and backward). This times
the public functions both ways, interleaved round by round:

* ``lp_step`` on ``[B, n]`` rows (l2, the paper's MNIST eps and alpha);
* ``mahalanobis`` forward and backward (``d.backward(ones)``, gradients of x, P and centers)
  at the DML paper's MNIST size and a small batch;

and reports the medians, the difference per call and the ratio. It is why the fast path
exists (issue 21, section 4).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from bench import _env


def _lp_case(batch: int, n: int):
    from pyens.ops import lp_step

    x = torch.rand(batch, n)
    d, g = torch.zeros_like(x), torch.randn_like(x)
    return f"lp_step {batch}x{n}", lambda: lp_step(d, g, x, norm="l2", eps=2.0, alpha=0.1)


def _mahalanobis_case(B: int, E: int, C: int, N: int):
    from pyens.ops import mahalanobis

    gen = torch.Generator().manual_seed(0)
    x, P, c = (torch.randn(*s, generator=gen).requires_grad_() for s in ((B, N), (E, N, N), (E, C, N)))
    w = torch.ones(B, E, C)
    return f"mahalanobis fwd+bwd {B}x{E}x{C}x{N}", lambda: mahalanobis(x, P, c).backward(w)


def measure(name: str, call, rounds: int, calls: int) -> dict:
    from pyens.ops.dispatch import through_registered_ops

    paths = {"registered op": through_registered_ops, "fast path": contextlib.nullcontext}
    for enter in paths.values():
        with enter():
            for _ in range(max(calls // 4, 10)):
                call()
    times = {k: [] for k in paths}
    for _ in range(rounds):
        for path, enter in paths.items():
            with enter():
                t = time.perf_counter()
                for _ in range(calls):
                    call()
                times[path].append((time.perf_counter() - t) / calls * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"case": name, "median_us": med, "overhead_us": med["registered op"] - med["fast path"],
            "ratio": med["registered op"] / med["fast path"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=21, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--calls", type=int, default=400, help="calls per round and path (default: %(default)s)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    load = _env.loadavg()
    cases = [_lp_case(1, 784), _lp_case(64, 784), _lp_case(100, 3072),
             _mahalanobis_case(256, 5, 10, 10), _mahalanobis_case(32, 5, 10, 10)]
    rows = [measure(name, call, args.rounds, args.calls) for name, call in cases]
    print(f"medians of {args.rounds} x {args.calls} calls per path, interleaved (load {load}):")
    print(_env.table(["call", "registered op (us)", "fast path (us)", "overhead (us)", "ratio"],
                     [[r["case"], f"{r['median_us']['registered op']:.1f}", f"{r['median_us']['fast path']:.1f}",
                       f"{r['overhead_us']:.1f}", f"{r['ratio']:.2f}"] for r in rows], right=4))
    if args.json:
        out = {**_env.environment(torch.device("cpu")), "load_before": load, "rounds": args.rounds,
               "calls": args.calls, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
