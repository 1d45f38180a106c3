"""What the first-use self-check adds: to the first call of each op, and to later calls.

Usage::

    OMP_NUM_THREADS=1 python -m bench.selftest_overhead --device cpu --rounds 7 \
        --json bench/results/cpu-<date>-selftest-overhead.json

Each measurement runs in a fresh interpreter (the check runs once per process), timing the
first and the next 200 calls of ``lp_step`` and then of ``mahalanobis`` (forward and backward)
in three situations:

- ``off``: ``PYENS_SELFTEST=0``, no check (the baseline);
- ``cold``: an empty cache directory, so the quick subset runs;
- ``cached``: the verdicts of a previous process on disk, so they are only read.

The first-call overhead is a situation's first-call median minus ``off``'s; the later calls'
medians should not differ (the choice is cached per op, the check is not consulted again).
``--autograd-warm`` runs one tiny ``autograd.grad`` before the timed calls: torch imports
sympy (~1 s) on its first ``autograd.grad`` with gradient outputs, which the check's float64
reference triggers and which any training process pays at its first backward anyway.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from bench import _env

CHILD = r"""
import json, statistics, sys, time, torch
device, warm = sys.argv[1], sys.argv[2] == "1"
if warm:
    a = torch.ones(2, requires_grad=True)
    torch.autograd.grad((a * a).sum(), a, torch.ones(()))
import pyens  # noqa: F401
from pyens.ops import lp_step, mahalanobis
out = {}
x = torch.rand(64, 784, device=device); d = torch.zeros_like(x); g = torch.randn_like(x)
def sync():
    if device != "cpu":
        torch.cuda.synchronize()
def timed(fn):
    t = time.perf_counter(); fn(); sync(); return time.perf_counter() - t
step = lambda: lp_step(d, g, x, norm="l2", eps=2.0, alpha=0.1)
out["lp_step first"] = timed(step)
out["lp_step later"] = statistics.median(timed(step) for _ in range(200))
xm = torch.randn(64, 32, device=device, requires_grad=True)
P = torch.randn(4, 32, 32, device=device); c = torch.randn(4, 10, 32, device=device)
dml = lambda: torch.autograd.grad(mahalanobis(xm, P, c).sum(), xm)
out["mahalanobis first"] = timed(dml)
out["mahalanobis later"] = statistics.median(timed(dml) for _ in range(200))
print(json.dumps(out))
"""


def measure(device: str, situation: str, cache: str, warm: bool) -> dict:
    env = dict(os.environ, PYENS_CACHE_DIR=cache)
    env.pop("PYENS_BACKEND", None)
    env["PYENS_SELFTEST"] = "0" if situation == "off" else "1"
    proc = subprocess.run([sys.executable, "-c", CHILD, device, "1" if warm else "0"], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="fresh processes per situation (default: %(default)s)")
    p.add_argument("--autograd-warm", action="store_true", help="import torch's autograd helpers first")
    p.add_argument("--json", default=None, help="also write the medians here (default: none)")
    args = p.parse_args(argv)
    load_before = _env.loadavg()
    runs = {s: [] for s in ("off", "cold", "cached")}
    for _ in range(args.rounds):
        for situation in runs:  # interleaved, so that machine load affects each alike
            with tempfile.TemporaryDirectory() as cache:
                if situation == "cached":
                    measure(args.device, "cold", cache, args.autograd_warm)  # fills the cache
                runs[situation].append(measure(args.device, situation, cache, args.autograd_warm))
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    print(f"device {args.device}, {args.rounds} fresh processes per situation, medians "
          f"({'autograd warm' if args.autograd_warm else 'cold interpreter'}):")
    print(f"{'':20s} {'off':>10s} {'cold':>10s} {'cached':>10s}   overhead cold / cached")
    for key in med["off"]:
        o, c, k = (med[s][key] * 1e3 for s in ("off", "cold", "cached"))
        print(f"{key + ' (ms)':20s} {o:10.3f} {c:10.3f} {k:10.3f}   {c - o:+.3f} / {k - o:+.3f}")
    _env.dump_json(args.json, {**_env.environment(torch.device(args.device)), "rounds": args.rounds,
                               "autograd_warm": args.autograd_warm, "load_before": load_before,
                               "load_after": _env.loadavg(), "medians_s": med})
    return 0


if __name__ == "__main__":
    sys.exit(main())
