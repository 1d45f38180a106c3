"""The MAT paper's Table 7 (wall-clock training time) on this machine: short real trainings.

Usage::

    python -m bench.train_time --steps 10 --members 3 --batches 5 --device cpu \\
        --json bench/results/cpu-<date>-train-time.json

Each method of Table 7 (standard training, vanilla AT, MSD, MAT) is trained by
``pyens.train`` -- the product's own loop, optimizer and schedule -- for one short epoch of
``--batches`` batches of the embedded MNIST training set, with the same backbone, K and M as
the cost table (:mod:`bench.cost_table`). ``--repeats`` such trainings of every method run
interleaved (after one untimed warm-up training each); the median is reported.

Measured: seconds per batch (the loop's own step timer: inner maximisation, loss, backward,
optimizer step; not the epoch-end checkpoint and diagnostics) and images/s. Everything
per epoch or per training is **extrapolated** from the measured time per batch, and labelled
so: an epoch of the 9,000 embedded training images, an epoch of the full 60,000-image MNIST
training set, and the paper's MNIST schedule (25 epochs of 60,000 images) at this K.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from bench import _env
from bench.cost_table import norms_for

METHODS = ("standard", "at", "msd", "mat")

# MAT paper, Table 7 (ResNet-18 on MNIST, ResNet-50 on CIFAR-10; K = 100 / 50), in seconds.
TABLE_7 = {
    "standard": {"label": "Standard Training", "mnist": 10 * 60 + 23, "cifar10": 40 * 60 + 11},
    "at": {"label": "AT", "mnist": 8 * 3600 + 12 * 60, "cifar10": 89 * 3600 + 42 * 60},
    "msd": {"label": "MSD", "mnist": 12 * 3600 + 56 * 60, "cifar10": 141 * 3600 + 23 * 60},
    "mat": {"label": "MAT", "mnist": 10 * 3600 + 2 * 60, "cifar10": 123 * 3600 + 7 * 60},
}
EMBEDDED_TRAIN = 9_000  # images of the embedded MNIST training split
MNIST_TRAIN = 60_000    # images of the full MNIST training set
PAPER_EPOCHS = 25       # MAT paper, Appendix C.1 (MNIST)


def train_once(method: str, *, out: Path, steps: int, members: int, backbone: str, batch_size: int,
               batches: int, device: str, seed: int) -> dict:
    """One short ``pyens.train`` run; its epoch record (``seconds``: the timed steps)."""
    import pyens
    from pyens.training import TrainConfig

    norms = norms_for(method, members)
    # The method fixes its own member count (1 for standard / at / msd, one per norm for mat).
    members = TrainConfig(method=method, members=members, norms=norms).resolved().members
    result = pyens.train(method, out=str(out), dataset="mnist", model=backbone, steps=steps, members=members,
                         norms=norms, batch_size=batch_size, train_size=batches * batch_size,
                         epochs=1, eval_size=0, device=device, seed=seed, progress=False)
    return result.history[-1]


def measure(methods=METHODS, *, steps: int = 10, members: int = 3, backbone: str = "small_cnn",
            batch_size: int = 100, batches: int = 5, device: str = "cpu", repeats: int = 3, seed: int = 0,
            log=None) -> list[dict]:
    """Median time per batch of short trainings of each method; returns the table's rows."""
    log = log or (lambda s: None)
    dev = _env.resolve_device(device)
    kw = {"steps": steps, "members": members, "backbone": backbone, "batch_size": batch_size, "device": str(dev),
          "seed": seed}
    per_batch = {m: [] for m in methods}
    load = [_env.loadavg()]
    with tempfile.TemporaryDirectory(prefix="pyens-train-time-") as tmp:
        for m in methods:  # warm-up: one batch each (allocator, kernels' first calls)
            train_once(m, out=Path(tmp) / f"warmup-{m}", batches=1, **kw)
        for r in range(repeats):
            order = list(methods[r % len(methods):]) + list(methods[:r % len(methods)])
            for m in order:
                rec = train_once(m, out=Path(tmp) / f"{m}-{r}", batches=batches, **kw)
                per_batch[m].append(rec["seconds"] / batches)
            load.append(_env.loadavg())
            log(f"round {r + 1}/{repeats}: " + ", ".join(f"{m} {per_batch[m][-1]:.2f} s/batch" for m in methods))

    env = _env.environment(dev)
    loads = [v for v in load if v is not None]
    at = _env.quartiles(per_batch["at"])[1] if "at" in per_batch else None
    rows = []
    for m in methods:
        q1, med, q3 = _env.quartiles(per_batch[m])
        paper = TABLE_7.get(m, {})
        paper_at = TABLE_7["at"]["mnist"]
        rows.append({
            "method": m, "label": paper.get("label", m),
            "s_per_batch": med, "s_per_batch_q1": q1, "s_per_batch_q3": q3, "s_per_batch_runs": per_batch[m],
            "images_per_s": batch_size / med,
            "measured_batches": batches, "measured_images": batches * batch_size,
            "ratio_vs_at": med / at if at else None,
            # extrapolated from s_per_batch (not measured):
            "extrapolated_epoch_s_embedded": math.ceil(EMBEDDED_TRAIN / batch_size) * med,
            "extrapolated_epoch_s_mnist60k": math.ceil(MNIST_TRAIN / batch_size) * med,
            "extrapolated_paper_schedule_s": PAPER_EPOCHS * math.ceil(MNIST_TRAIN / batch_size) * med,
            "paper_mnist_s": paper.get("mnist"), "paper_cifar10_s": paper.get("cifar10"),
            "paper_mnist_ratio_vs_at": paper["mnist"] / paper_at if paper else None,
            "steps": steps, "members": members, "backbone": backbone, "batch_size": batch_size,
            "dataset": "mnist (embedded)", "optimizer": "adam", "repeats": repeats,
            "norms": list(norms_for(m, members)) if m != "standard" else [],
            "loadavg_min": min(loads) if loads else None, "loadavg_max": max(loads) if loads else None,
            **env,
        })
    return rows


def duration(s: float | None) -> str:
    """``8h12min``, ``10min23s``, ``41.2s`` (the paper's style)."""
    if s is None:
        return "-"
    if s >= 3600:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}min"
    if s >= 60:
        return f"{int(s // 60)}min{int(s % 60):02d}s"
    return f"{s:.1f}s"


def markdown(rows: list[dict], *, heading: str = "##") -> str:
    """Table 7's layout (methods as columns): measured, extrapolated (labelled) and the paper's."""
    from bench.cost_table import setting

    r0 = rows[0]
    b = r0["batch_size"]
    cols = [f"{r['label']} (`{r['method']}`)" for r in rows]

    def line(name, f):
        return [name] + [f(r) for r in rows]

    body = [
        line("measured: s / batch (median; IQR)",
             lambda r: f"{r['s_per_batch']:.3f} ({r['s_per_batch_q1']:.3f}–{r['s_per_batch_q3']:.3f})"),
        line("measured: images / s", lambda r: f"{r['images_per_s']:.1f}"),
        line("measured: × AT", lambda r: f"{r['ratio_vs_at']:.2f}" if r["ratio_vs_at"] is not None else "-"),
        line(f"*extrapolated*: epoch of the {EMBEDDED_TRAIN:,} embedded images",
             lambda r: duration(r["extrapolated_epoch_s_embedded"])),
        line(f"*extrapolated*: epoch of full MNIST ({MNIST_TRAIN:,})", lambda r: duration(r["extrapolated_epoch_s_mnist60k"])),
        line(f"*extrapolated*: paper's schedule ({PAPER_EPOCHS} epochs × {MNIST_TRAIN:,}) at K = {r0['steps']}",
             lambda r: duration(r["extrapolated_paper_schedule_s"])),
        line("paper, MNIST (ResNet-18, K = 100)", lambda r: duration(r["paper_mnist_s"])),
        line("paper, MNIST: × AT",
             lambda r: f"{r['paper_mnist_ratio_vs_at']:.2f}" if r["paper_mnist_ratio_vs_at"] else "-"),
    ]
    out = [f"{heading} Table 7 reproduction: training time", "",
           setting(r0) + ".",
           (f"Each figure: median of {r0['repeats']} interleaved short trainings (`pyens.train`, one epoch of "
           f"{r0['measured_batches']} batches = {r0['measured_images']} images) per method, after one warm-up "
           f"training each; s / batch is the training loop's own step timer. *Extrapolated* rows are the "
           f"measured s / batch times the batches of that schedule (B = {b}), not measurements. Load average "
           f"{r0['loadavg_min']}–{r0['loadavg_max']} on {r0['cpus']} CPUs."), "",
           _env.table([""] + cols, body, right=len(cols))]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_time", description=__doc__.split("\n\n")[0])
    _env.add_common_args(ap, methods=METHODS, repeats=3)
    ap.add_argument("--batches", type=int, default=5, help="batches per short training (5)")
    args = ap.parse_args(argv)
    _env.run_table(args, measure, markdown, **({} if args.render else {"batches": args.batches}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
