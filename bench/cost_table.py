"""Reproduce the MAT paper's Table 6: forward/backward passes and time per training batch.

Usage::

    python -m bench.cost_table --steps 10 --members 3 --backbone small_cnn --batch-size 100 \\
        --device cpu --json bench/results/cpu-<date>-cost-table.json

For every method of Table 6 (``standard``, ``mimo``, ``at``, ``ensemble_at``, ``avg``, ``max``,
``msd``, ``mimo_at``, ``mat``, ``mat_msd``), and ``mat_msd_batch`` (``mat_msd`` with the MAT
authors' adversary, :data:`VARIANTS`), this runs real training batches -- the method's
``loss`` (inner maximisation + outer loss), ``backward`` and an Adam step, exactly what
``pyens.train`` does per batch -- with the same backbone, steps K and members M, on the same
real MNIST batches (the embedded set, ``pyens.data.load("mnist")``):

1. one batch under :func:`pyens.training.count_passes`: forward and backward passes in
   batch-equivalents (a pass over ``m * B`` examples counts ``m``; a vanilla ensemble's pass
   counts once per member network), set beside the paper's formula
   (:meth:`pyens.training.methods.Method.passes`);
2. ``--warmup`` untimed rounds, then ``--repeats`` timed rounds; a round runs one batch of
   every method, the order rotating from round to round, so that machine noise (a shared,
   busy machine) hits every method alike. Reported: the median time per batch, its
   quartiles, and the ratio to vanilla AT (``at``).

Prints the Markdown table in the layout of Table 6 and the project's targets (MAT within
1.1x of AT; MSD and ensemble AT at least 2.5x MAT); ``--json`` writes the rows (a list, each
with device, versions and commit). ``--device cuda`` runs the same on a GPU (synchronised
timing).
"""
from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass

import torch

from bench._env import (
    add_common_args,
    environment,
    loadavg,
    quartiles,
    resolve_device,
    run_table,
    sync,
    table,
)
from pyens.training import TrainConfig, build_network, count_passes
from pyens.training.methods import DEFAULT_NORMS, StepContext, get_method
from pyens.training.run import counted_networks

METHODS = ("standard", "mimo", "at", "ensemble_at", "avg", "max", "msd", "mimo_at", "mat", "mat_msd", "mat_msd_batch")

# Rows that are a method with other settings: row key -> (method, config overrides).
VARIANTS = {
    # The adversary of the MAT authors' code (the paper's "MAT" numbers): per member, the norm
    # with the highest batch loss at each step; random start in each slot's ball; k from 5..20.
    "mat_msd_batch": ("mat_msd", {"msd_select": "batch", "random_start": True, "k_range": (5, 20)}),
}


def method_of(row: str) -> str:
    """The training method a row runs (a variant's base method, else the row key itself)."""
    return VARIANTS.get(row, (row, {}))[0]

# method: (the paper's row of Table 6, forward formula, backward formula); K steps, M members.
TABLE_6 = {
    "standard": ("Standard Training", "1", "1"),
    "mimo": ("Standard MIMO Training", "1", "1"),
    "at": ("Vanilla AT (K-step PGD)", "K + 1", "K + 1"),
    "ensemble_at": ("M-Vanilla Ensemble AT (K-step PGD)", "M(K + 1)", "M(K + 1)"),
    "avg": ("Multi-perturbation AT (K-step PGD), avg", "MK + M", "MK + M"),
    "max": ("Multi-perturbation AT (K-step PGD), max", "MK + M", "MK + M"),
    "msd": ("M-MSD AT (K-step PGD)", "(1 + M)K + 1", "K + 1"),
    "mimo_at": ("M-MIMO AT without Approx. (K-step PGD)", "K + 1", "MK + 1"),
    "mat": ("**MAT**: M-MIMO Approx. AT (K-step PGD)", "K + 1", "K + 1"),
    "mat_msd": ("M-MIMO MSD (K-step PGD)", "(1 + M)K + 1", "K + 1"),
    "mat_msd_batch": ("MAT as the authors ran it: M-MIMO MSD, batch rule", "(1 + M)K + 1", "K + 1"),
}

# The project's targets: (label, numerator, denominator, "<=" | ">=", bound) on time per batch.
TARGETS = (
    ("MAT time per batch <= 1.1x vanilla AT", "mat", "at", "<=", 1.1),
    ("MSD time per batch >= 2.5x MAT", "msd", "mat", ">=", 2.5),
    ("M-ensemble AT time per batch >= 2.5x MAT", "ensemble_at", "mat", ">=", 2.5),
)


def norms_for(method: str, members: int) -> tuple[str, ...]:
    """The attack norms giving ``members`` sub-models / perturbation types.

    Members cycle through (l1, l2, linf), so M = 3 is the paper's setting; vanilla AT attacks
    in linf alone (Madry et al.).
    """
    if method == "at":
        return ("linf",)
    return tuple(DEFAULT_NORMS[i % len(DEFAULT_NORMS)] for i in range(members))


def config(method: str, *, steps: int, members: int, backbone: str, batch_size: int, device: str) -> TrainConfig:
    """The resolved training config of row ``method`` (a method or a :data:`VARIANTS` key)."""
    base, overrides = VARIANTS.get(method, (method, {}))
    return TrainConfig(method=base, steps=steps, members=members, model=backbone,
                       norms=norms_for(base, members), batch_size=batch_size, device=device, **overrides).resolved()


@dataclass
class MethodBench:
    """One method's network, optimizer and step context, ready to train batches."""

    name: str
    cfg: TrainConfig
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ctx: StepContext

    @classmethod
    def build(cls, name: str, data, device: torch.device, *, seed: int = 0, **kw) -> MethodBench:
        cfg = config(name, device=str(device), **kw)
        torch.manual_seed(seed)  # the same initial weights for every method of one network kind
        net = build_network(cfg, data).to(device).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        ctx = StepContext(net=net, train_net=net, cfg=cfg, generator=torch.Generator().manual_seed(seed + 1))
        return cls(name, cfg, net, optimizer, ctx)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One training batch: inner maximisation + outer loss, backward, optimizer step."""
        out = get_method(method_of(self.name)).loss(self.ctx, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()

    def profile(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Where one training batch's time goes, in ms (:data:`PROFILE_PARTS`; host time)."""
        from torch.profiler import ProfilerActivity, profile

        device = x.device
        sync(device)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.step(x, y)
            sync(device)
        wall = 1e3 * (time.perf_counter() - t0)
        split = dict.fromkeys(PROFILE_PARTS, 0.0)
        for e in prof.events():
            if e.cpu_parent is None:  # top level: a forward op, an autograd node, a launch, ...
                split[_part(e.name)] += e.cpu_time_total / 1e3
        split[PROFILE_PARTS[-1]] = max(wall - sum(split.values()), 0.0)
        split["total"] = wall
        return split

    def count(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(forward, backward) passes of one training batch, in batch-equivalents."""
        with count_passes(counted_networks(self.net), x.shape[0]) as c:
            self.step(x, y)
        return c.forward, c.backward


PROFILE_PARTS = ("forward & tensor ops", "backward", "lp_step", "optimizer", "python & untracked")


def _part(name: str) -> str:
    """The part of :data:`PROFILE_PARTS` a top-level profiler event belongs to."""
    if name.startswith("autograd::engine::evaluate_function"):
        return "backward"
    if name.startswith("Optimizer."):
        return "optimizer"
    if "lp_rows" in name or "lp_step" in name or "lp_project" in name:
        return "lp_step"
    return "forward & tensor ops"


def mnist_batches(batch_size: int, count: int, device: torch.device, seed: int = 0):
    """``count`` distinct real MNIST training batches ``(x [B, 1, 28, 28], y [B])`` and the dataset."""
    from pyens.data import load

    data = load("mnist", "train")
    if batch_size * count > len(data):
        count = max(1, len(data) // batch_size)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    batches = []
    for i in range(count):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        batches.append((data.images[idx].to(device), data.labels[idx].to(device)))
    return data, batches


def measure(methods=METHODS, *, steps: int = 10, members: int = 3, backbone: str = "small_cnn",
            batch_size: int = 100, device: str = "cpu", repeats: int = 5, warmup: int = 1, seed: int = 0,
            profile: bool = False, log=None) -> list[dict]:
    """Count and time one training batch of each method; returns the table's rows.

    Rows are in ``methods`` order; times in ms. ``profile``: also split one more batch of each
    method by :data:`PROFILE_PARTS` (torch.profiler; row key ``profile_ms``). ``log(str)``
    reports progress (stderr).
    """
    for name in methods:
        get_method(method_of(name))  # unknown names fail before any work
    log = log or (lambda s: None)
    dev = resolve_device(device)
    data, batches = mnist_batches(batch_size, 1 + warmup + repeats, dev, seed)
    kw = {"steps": steps, "members": members, "backbone": backbone, "batch_size": batch_size}
    benches = {m: MethodBench.build(m, data, dev, seed=seed, **kw) for m in methods}

    counts = {}
    x, y = batches[0]
    for name, b in benches.items():  # the counted batch is also each method's first warm-up
        counts[name] = b.count(x, y)
    seconds = {m: [] for m in methods}
    cpu_seconds = {m: [] for m in methods}  # process CPU time: steadier than wall time on a shared CPU
    load = [loadavg()]
    for r in range(warmup + repeats):
        x, y = batches[(1 + r) % len(batches)]
        order = list(methods[r % len(methods):]) + list(methods[:r % len(methods)])
        gc.collect()
        for name in order:
            sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            benches[name].step(x, y)
            sync(dev)
            if r >= warmup:
                seconds[name].append(time.perf_counter() - t0)
                cpu_seconds[name].append(time.process_time() - c0)
        load.append(loadavg())
        log(f"round {r + 1}/{warmup + repeats}{' (warm-up)' if r < warmup else ''}: "
            + ", ".join(f"{m} {1e3 * seconds[m][-1]:.0f} ms" for m in methods if r >= warmup))

    split = {name: benches[name].profile(*batches[0]) for name in methods} if profile else {}
    env = environment(dev)
    loads = [v for v in load if v is not None]
    at = quartiles(seconds["at"])[1] if "at" in seconds else None
    cpu_at = quartiles(cpu_seconds["at"])[1] if "at" in seconds else None
    on_cpu = dev.type == "cpu"
    rows = []
    for name in methods:
        label, ff, fb = TABLE_6.get(name, (name, "?", "?"))
        f_fwd, f_bwd = get_method(method_of(name)).passes(steps, members)
        q1, med, q3 = quartiles(seconds[name])
        fwd, bwd = counts[name]
        rows.append({
            "method": name, "label": label,
            "forward": fwd, "backward": bwd,
            "formula_forward": f_fwd, "formula_backward": f_bwd,
            "formula_forward_text": ff, "formula_backward_text": fb,
            "counts_match": (fwd, bwd) == (f_fwd, f_bwd),
            "ms_per_batch": 1e3 * med, "ms_q1": 1e3 * q1, "ms_q3": 1e3 * q3,
            "ms_min": 1e3 * min(seconds[name]), "ms_max": 1e3 * max(seconds[name]),
            "ms_rounds": [1e3 * s for s in seconds[name]],
            "ratio_vs_at": med / at if at else None,
            # CPU device only: the process's CPU time (all threads), median, and its ratio to AT
            "cpu_ms_per_batch": 1e3 * quartiles(cpu_seconds[name])[1] if on_cpu else None,
            "cpu_ms_rounds": [1e3 * s for s in cpu_seconds[name]] if on_cpu else None,
            "cpu_ratio_vs_at": quartiles(cpu_seconds[name])[1] / cpu_at if on_cpu and cpu_at else None,
            "images_per_s": batch_size / med,
            "steps": steps, "members": members, "backbone": backbone, "batch_size": batch_size,
            "dataset": "mnist (embedded)", "optimizer": "adam", "repeats": repeats, "warmup": warmup,
            "norms": list(benches[name].cfg.norms),
            "profile_ms": split.get(name),
            "loadavg_min": min(loads) if loads else None, "loadavg_max": max(loads) if loads else None,
            **env,
        })
    return rows


# ------------------------------------------------------------------------------------------
# reports

def by_method(rows: list[dict]) -> dict[str, dict]:
    return {r["method"]: r for r in rows}


def paired_ratios(a: dict, b: dict) -> list[float]:
    """Round-by-round ``a / b`` time ratios (the same round ran both, so load drifts cancel)."""
    return [x / y for x, y in zip(a["ms_rounds"], b["ms_rounds"])]


def targets(rows: list[dict]) -> list[dict]:
    """The project's targets on ``rows``.

    Judged on the median of the round-by-round wall-time ratios: the two methods of a pair ran
    seconds apart in every round, so a load that drifts over the run cancels in each ratio
    (the ratio of the two medians does not pair them, and is shown beside it). On the CPU
    the same paired median in process CPU time is a second, steadier reading.
    """
    have = by_method(rows)
    out = []
    for label, num, den, op, bound in TARGETS:
        if num not in have or den not in have:
            continue
        a, b = have[num], have[den]
        q1, med, q3 = quartiles(paired_ratios(a, b))
        cpu = None
        if a.get("cpu_ms_rounds") and b.get("cpu_ms_rounds"):
            cpu = quartiles([x / y for x, y in zip(a["cpu_ms_rounds"], b["cpu_ms_rounds"])])[1]
        met = med <= bound if op == "<=" else med >= bound
        out.append({"target": label, "ratio": med, "paired_q1": q1, "paired_q3": q3,
                    "ratio_of_medians": a["ms_per_batch"] / b["ms_per_batch"], "cpu_ratio": cpu,
                    "bound": bound, "op": op, "met": met})
    return out


def _count(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.2f}"


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def _formula(text: str, value: int) -> str:
    return text if text in ("1", "?") else f"{text} = {value}"


def setting(r: dict) -> str:
    """One line naming the setting of a row (K, M, backbone, B, device)."""
    return (f"K = {r['steps']}, M = {r['members']}, `{r['backbone']}` on MNIST 1×28×28, B = {r['batch_size']}, "
            f"Adam; {r['device']} ({r['device_name']}, {r['threads']} thread{'s' if r['threads'] != 1 else ''}), "
            f"torch {r['torch']}, "
            f"commit {str(r['commit'])[:9]}{' + local edits' if r.get('dirty') else ''}")


def markdown(rows: list[dict], *, heading: str = "##", beside: tuple[list[dict], ...] = ()) -> str:
    """Table 6 with the measured counts beside the paper's formulas, times and the targets.

    ``beside``: the rows of the same table measured on other devices (a GPU run beside the
    CPU one); their times get columns of their own, the counts are shown once.
    """
    runs = [rows, *beside]
    out = [f"{heading} Table 6 reproduction: passes and time per training batch", ""]
    for run in runs:
        r0 = run[0]
        cpu = r0.get("cpu_ms_per_batch") is not None
        out.append(f"- {r0['device']}: " + setting(r0) + f"; median wall clock of {r0['repeats']} interleaved "
                   f"rounds after {r0['warmup']} warm-up round(s), IQR beside it"
                   + ("; CPU: the process's CPU time per batch" if cpu else "")
                   + f"; load average {r0['loadavg_min']}–{r0['loadavg_max']} on {r0['cpus']} CPUs.")
    out += ["", ("Passes are batch-equivalents counted by hooks on the network (a pass over m·B examples "
            "counts m; a vanilla ensemble's pass counts once per member network)."), ""]
    header = ["Methods (paper's Table 6)", "method", "forward: paper", "forward: measured", "backward: paper",
              "backward: measured"]
    for run in runs:
        dev = run[0]["device"]
        header += [f"ms / batch ({dev})", "IQR (ms)", f"× AT ({dev})"]
        header += ["CPU ms / batch", "× AT (CPU time)"] if run[0].get("cpu_ms_per_batch") is not None else []
    others = [by_method(run) for run in beside]
    body = []
    for r in rows:
        row = [r["label"], f"`{r['method']}`",
               _formula(r["formula_forward_text"], r["formula_forward"]), _count(r["forward"]),
               _formula(r["formula_backward_text"], r["formula_backward"]), _count(r["backward"])]
        for o in [r] + [other.get(r["method"]) for other in others]:
            if o is None:
                row += ["-"] * 3
                continue
            row += [_ms(o["ms_per_batch"]), f"{_ms(o['ms_q1'])}–{_ms(o['ms_q3'])}", _ratio(o["ratio_vs_at"])]
            row += [_ms(o["cpu_ms_per_batch"]), _ratio(o["cpu_ratio_vs_at"])] if o.get("cpu_ms_per_batch") else []
        body.append(row)
    out.append(table(header, body, right=len(header) - 2))
    bad = sorted({r["method"] for run in runs for r in run if not r["counts_match"]})
    out += ["", "Every measured count equals the paper's formula." if not bad
            else f"**Counts differ from the formula for: {', '.join(bad)}.**"]
    body = []
    for run in runs:
        for x in targets(run):
            body.append([x["target"], run[0]["device"], f"{x['ratio']:.2f}×",
                         f"{x['paired_q1']:.2f}–{x['paired_q3']:.2f}", f"{x['ratio_of_medians']:.2f}×",
                         "-" if x["cpu_ratio"] is None else f"{x['cpu_ratio']:.2f}×", "yes" if x["met"] else "**no**"])
    if body:
        out += ["", table(["target", "device", "wall time: median of per-round ratios (judged)", "IQR",
                           "ratio of the medians", "CPU time: median of per-round ratios", "met"], body,
                          right={2, 3, 4, 5})]
    if rows[0].get("profile_ms"):
        out += ["", breakdown(rows)]
    return "\n".join(out) + "\n"


def breakdown(rows: list[dict]) -> str:
    """The ``--profile`` table: where one batch's time goes (one profiled batch per method)."""
    head = ["method", *PROFILE_PARTS, "profiled batch (ms)"]
    body = [[f"`{r['method']}`"] + [_ms(r["profile_ms"][p]) for p in PROFILE_PARTS] + [_ms(r["profile_ms"]["total"])]
            for r in rows]
    return ("Where the time goes (ms, one extra batch per method under torch.profiler, top-level events: network "
            "forward and other tensor ops, autograd backward nodes, the fused lp step, Adam; the rest is Python "
            "and untracked time):\n\n" + table(head, body, right=len(head) - 1))


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cost_table", description=__doc__.split("\n\n")[0])
    add_common_args(ap, methods=METHODS, repeats=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds after the counted batch (1)")
    ap.add_argument("--profile", action="store_true", help="also split one batch per method by part (torch.profiler)")
    args = ap.parse_args(argv)
    if not args.render and "at" not in args.methods.split(","):
        raise SystemExit("--methods must include 'at': every ratio is against vanilla AT")
    rows = run_table(args, measure, markdown, **({} if args.render else {"warmup": args.warmup,
                                                                       "profile": args.profile}))
    return 0 if all(r["counts_match"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
