"""Per-call time of the public ops at the papers' sizes, and of a DML training step: for
comparing two builds (a change to the call path, such as issue 21's one autograd definition).

Usage (one build per checkout; run them alternately, a few processes each)::

    OMP_NUM_THREADS=1 python -m bench.public_calls --json after-1.json          # this checkout
    cd ../other && OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m bench.public_calls --json before-1.json
    python -m bench.public_calls --compare before-*.json -- after-*.json

Each figure is the median of 15 blocks of calls after a warm-up; the comparison takes the
median over the processes of each side. Only public APIs are called, so any two versions of
pyens can be compared.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _median_us(call, calls: int, rounds: int = 15) -> float:
    for _ in range(max(calls // 4, 2)):
        call()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def _cases():
    """``(name, calls per block, make)``: ``make()`` builds the inputs and returns the call."""
    from pyens.ops import lp_step, mahalanobis

    gen = torch.Generator().manual_seed(0)

    def maha(B, E, C, N, backward):
        x, P, c = (torch.randn(*s, generator=gen).requires_grad_(backward) for s in ((B, N), (E, N, N), (E, C, N)))
        w = torch.ones(B, E, C)
        return (lambda: mahalanobis(x, P, c).backward(w)) if backward else (lambda: mahalanobis(x, P, c))

    def lp(shape, **kw):
        x = torch.rand(*shape, generator=gen)
        d, g = torch.zeros_like(x), torch.randn(*shape, generator=gen)
        return lambda: lp_step(d, g, x, **kw)

    for B in (256, 32):
        yield f"mahalanobis fwd+bwd {B}x5x10x10 (us)", 200, lambda B=B: maha(B, 5, 10, 10, True)
        yield f"mahalanobis fwd {B}x5x10x10 (us)", 400, lambda B=B: maha(B, 5, 10, 10, False)
    yield "lp_step 1x784 l2 (us)", 1000, lambda: lp((1, 784), norm="l2", eps=2.0, alpha=0.1)
    yield "lp_step 128x3x784 MAT members (us)", 100, lambda: lp(
        (128, 3, 784), norm=("l1", "l2", "linf"), eps=(10, 2.0, 0.3), alpha=(0.8, 0.1, 0.01), k=20, members=3)
    yield "quick-mnist-dml training step, B=100 (us)", 10, _dml_step


def measure(only: str = "") -> dict[str, float]:
    """Each case's median per-call time; ``only`` keeps the cases whose name starts with it."""
    return {name: _median_us(make(), calls) for name, calls, make in _cases() if name.startswith(only)}


def _dml_step():
    """Forward, backward and Adam step of the quick DML config's network (5 LeNet members,
    each ending in a distance map layer) on 100 MNIST-sized inputs."""
    import pyens.data
    from pyens.training.config import load_config
    from pyens.training.run import build_network

    cfg = load_config("quick-mnist-dml")
    net = build_network(cfg, pyens.data.load("mnist", "test"))  # the embedded MNIST's shape and statistics
    x = torch.rand(100, cfg.members, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(net.parameters(), 1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        net(x).float().sum().backward()
        opt.step()

    return step


def compare(before: list[str], after: list[str]) -> str:
    def load(paths):
        runs = [json.load(open(p))["results"] for p in paths]
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    b, a = load(before), load(after)
    lines = ["| call | before | after | after / before |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {k} | {b[k]:.1f} | {a[k]:.1f} | {a[k] / b[k]:.2f} |" for k in b if k in a]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write this process's figures here")
    ap.add_argument("--only", default="", help="only the cases whose name starts with this")
    ap.add_argument("--compare", nargs="+", metavar="BEFORE.json ... -- AFTER.json ...",
                    help="print the medians of two sets of result files, separated by --")
    args, rest = ap.parse_known_args(argv)
    if args.compare:
        print(compare(args.compare, [r for r in rest if r != "--"]))
        return 0
    import pyens

    results = measure(args.only)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pyens_file": pyens.__file__, "threads": torch.get_num_threads(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
