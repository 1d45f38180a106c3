"""MSD's candidate scoring: one forward over the P stacked candidate batches, or one per norm.

Usage::

    python -m bench.msd_score --batch-size 100 --members 3 --steps 10 --threads 1 --rounds 15

Each MSD step scores P candidates (one per norm) without a backward. ``score="stacked"``
concatenates them into one batch of P*B (``M``-slot) inputs and runs the network once;
``"per_norm"`` runs it P times. Both give the same attack and the same Table 6 count (a pass
over P*B examples counts P). This times a whole ``mimo_msd`` attack of each kind on the same
MIMO network and batch, alternating the order from round to round, and reports the medians,
their quartiles and the per-round ratio ``stacked / per_norm``; ``score="auto"`` picks per
device from what this measures (``docs/training.md``, "Scoring the candidates").
"""
from __future__ import annotations

import argparse
import time

import torch

from bench import _env

SCORES = ("stacked", "per_norm")


def measure(*, backbone: str, batch_size: int, members: int, steps: int, device: str, rounds: int,
            seed: int = 0) -> dict:
    from pyens.attacks import mimo_msd
    from pyens.nn import MIMO

    dev = _env.resolve_device(device)
    torch.manual_seed(seed)
    net = MIMO(backbone, members=members, in_channels=1, num_classes=10).to(dev).eval()
    x = torch.rand(batch_size, members, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (batch_size, members), device=dev)
    kw = dict(norms=("l1", "l2", "linf"), eps=(10.0, 2.0, 0.3), alpha=(2.5, 0.5, 0.075), steps=steps)
    times = {s: [] for s in SCORES}
    for r in range(rounds + 1):  # round 0 warms up
        for s in (SCORES if r % 2 == 0 else SCORES[::-1]):
            _env.sync(dev)
            t0 = time.perf_counter()
            mimo_msd(net, x, y, score=s, **kw)
            _env.sync(dev)
            if r:
                times[s].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["stacked"], times["per_norm"])]
    return {"backbone": backbone, "batch_size": batch_size, "members": members, "steps": steps, "rounds": rounds,
            **{f"{s}_ms": [1e3 * t for t in v] for s, v in times.items()},
            **{f"{s}_median_ms": 1e3 * _env.quartiles(v)[1] for s, v in times.items()},
            "ratio_stacked_per_norm": _env.quartiles(ratios), **_env.environment(dev)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.msd_score", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="small_cnn")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    _env.check_counts(ap, args, ("batch_size", "members", "steps", "rounds"))
    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(backbone=args.backbone, batch_size=args.batch_size, members=args.members, steps=args.steps,
                  device=args.device, rounds=args.rounds)
    q1, med, q3 = res["ratio_stacked_per_norm"]
    print(f"mimo_msd, {args.backbone}, B = {args.batch_size}, M = {args.members}, K = {args.steps}, "
          f"{res['device']} ({res['threads']} threads), {args.rounds} rounds")
    for s in SCORES:
        print(f"  {s:9s} median {res[s + '_median_ms']:8.1f} ms")
    print(f"  stacked / per_norm, per round: median {med:.2f} (IQR {q1:.2f}-{q3:.2f})")
    _env.dump_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
