"""What routing an eager call through the registered ``torch.library`` op would cost.

Usage::

    OMP_NUM_THREADS=1 python -m bench.dispatch_overhead --rounds 21 \
        --json bench/results/cpu-<date>-dispatch-overhead.json

In eager mode the public ops call their backend's implementation directly; under
``torch.compile`` they go through the registered op (``torch.ops.pyens.lp_step``). This times
both paths on the same ``lp_step`` call (``[B, n]`` rows, l2, the paper's MNIST eps/alpha),
interleaved round by round, and reports the medians, the difference per call and the ratio.
It decides whether eager calls can take the registered path without a fast path of their own
(issue 21, section 4).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bench import _env


def measure(batch: int, n: int, rounds: int, calls: int) -> dict:
    lp = sys.modules["pyens.ops.lp_step"]
    x = torch.rand(batch, n)
    d, g = torch.zeros_like(x), torch.randn_like(x)
    args = (d, g, x, 0, [1], [2.0], [0.1], [20], 0.0, 1.0, True)  # one member: l2, eps 2, alpha 0.1
    paths = {"registered op": lp._lp_step_op, "direct": lp._lp_step_impl}
    for f in paths.values():
        for _ in range(max(calls // 4, 10)):
            f(*args)
    times = {k: [] for k in paths}
    for _ in range(rounds):
        for name, f in paths.items():
            t = time.perf_counter()
            for _ in range(calls):
                f(*args)
            times[name].append((time.perf_counter() - t) / calls * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": [batch, n], "median_us": med, "overhead_us": med["registered op"] - med["direct"],
            "ratio": med["registered op"] / med["direct"]}


def main(argv=None) -> int:
    import pyens.ops  # noqa: F401  (registers the ops)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=21, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--calls", type=int, default=1000, help="calls per round and path (default: %(default)s)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    load = _env.loadavg()
    rows = [measure(b, n, args.rounds, args.calls) for b, n in ((1, 784), (64, 784), (100, 3072))]
    print(f"lp_step, medians of {args.rounds} x {args.calls} calls per path, interleaved (load {load}):")
    print(_env.table(["rows", "registered op (us)", "direct (us)", "overhead (us)", "ratio"],
                     [[f"{r['shape'][0]}x{r['shape'][1]}", f"{r['median_us']['registered op']:.1f}",
                       f"{r['median_us']['direct']:.1f}", f"{r['overhead_us']:.1f}", f"{r['ratio']:.2f}"]
                      for r in rows], right=1))
    if args.json:
        out = {**_env.environment(torch.device("cpu")), "load_before": load, "rounds": args.rounds,
               "calls": args.calls, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
