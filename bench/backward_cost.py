"""What one pass of a backbone costs: the b / f behind Table 6's time ratios.

Usage::

    python -m bench.backward_cost --backbone small_cnn --batch-size 100 --threads 1 --rounds 15

Table 6 counts forward and backward passes; its time ratios follow from what a backward
costs against a forward (``docs/performance.md``: MSD / MAT = (41 f + 11 b) / (11 f + 11 b) at
K = 10, M = 3). This times, on one batch of random pixels, the four kinds of pass a training
batch is made of:

- ``forward``: no graph (MSD's extra candidate evaluations);
- ``forward+graph``: a forward that records the graph;
- ``attack step``: forward + ``autograd.grad`` of the summed CE to the input (one PGD step's
  passes; autograd computes no weight gradient);
- ``training step``: forward + ``backward()`` into the parameters.

Every kind runs in each round (the order rotating from round to round), ``--calls`` calls per
timing, and the medians over rounds are reported with their quartiles. The backward's cost,
``b``, is the step's median minus the ``forward+graph`` median, and is reported as a
multiple of that same ``forward+graph`` median: ``b / f`` compares the backward with the
forward it follows (the one that records the graph), not with the no-graph forward, so both
terms come from the same kind of pass.

``--render PATH`` prints the table of a saved result, with the ratios recomputed from its
medians by this definition (files written before 2026-11-23 stored ``backward_over_forward``,
which divided by the no-graph forward; it is ignored).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from bench import _env

KINDS = ("forward", "forward+graph", "attack step", "training step")


def _passes(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    def forward():
        with torch.no_grad():
            net(x)

    def forward_graph():
        net(x.clone().requires_grad_(True))

    def attack_step():
        d = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(net(d), y, reduction="sum"), d)

    def training_step():
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    return dict(zip(KINDS, (forward, forward_graph, attack_step, training_step), strict=True))


def measure(*, backbone: str, batch_size: int, device: str, rounds: int, calls: int, seed: int) -> dict:
    from pyens.nn import build_backbone

    dev = _env.resolve_device(device)
    torch.manual_seed(seed)
    net = build_backbone(backbone, in_channels=1, num_classes=10).to(dev).eval()
    x = torch.rand(batch_size, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    fns = _passes(net, x, y)
    for fn in fns.values():  # warm-up: allocator, oneDNN primitives, CUDA kernels
        fn()
    times = {k: [] for k in KINDS}
    for r in range(rounds):
        order = KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]
        for kind in order:
            _env.sync(dev)
            t0 = time.perf_counter()
            for _ in range(calls):
                fns[kind]()
            _env.sync(dev)
            times[kind].append((time.perf_counter() - t0) / calls * 1e3)
    rows = {k: dict(zip(("q1_ms", "median_ms", "q3_ms"), _env.quartiles(v), strict=True)) for k, v in times.items()}
    for kind, ratio in backward_ratios(rows).items():
        rows[kind]["backward_over_forward_graph"] = ratio
    return {"backbone": backbone, "batch_size": batch_size, "rounds": rounds, "calls": calls,
            "passes": rows, **_env.environment(dev)}


def backward_ratios(passes: dict) -> dict:
    """``b / f`` of the two backward kinds from the medians: ``(step - forward+graph) / forward+graph``."""
    f = passes["forward+graph"]["median_ms"]
    return {kind: (passes[kind]["median_ms"] - f) / f for kind in ("attack step", "training step")}


def markdown(result: dict) -> str:
    rows = []
    ratios = backward_ratios(result["passes"])
    for kind in KINDS:
        r = result["passes"][kind]
        ratio = ratios.get(kind)
        rows.append([kind, f"{r['median_ms']:.2f}", f"{r['q1_ms']:.2f}–{r['q3_ms']:.2f}",
                     "-" if ratio is None else f"{ratio:.2f}"])
    head = (f"{result['backbone']}, B = {result['batch_size']}, {result['device_name']}, "
            f"{result['threads']} thread(s), {result['rounds']} rounds of {result['calls']} calls")
    return head + "\n\n" + _env.table(["pass", "median (ms)", "quartiles (ms)", "backward / forward+graph"], rows, right=3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.backward_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="small_cnn", help="an MNIST backbone of pyens.nn (small_cnn)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (15)")
    ap.add_argument("--calls", type=int, default=5, help="calls per timing (5)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the result to PATH")
    ap.add_argument("--render", metavar="PATH", help="print the table of a saved result (measures nothing)")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(markdown(json.load(f)))
        return 0
    _env.check_counts(ap, args, ("batch_size", "rounds", "calls"))
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(backbone=args.backbone, batch_size=args.batch_size, device=args.device,
                     rounds=args.rounds, calls=args.calls, seed=args.seed)
    print(markdown(result))
    _env.dump_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
