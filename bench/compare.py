"""Ratios between two benchmark runs: ``python bench/compare.py A.json B.json``.

Usage::

    python bench/compare.py A.json B.json [--markdown PATH]    # or: python -m bench.compare ...

Reads any result file of ``bench/results/``: a pytest-benchmark ``--benchmark-json`` file
(the kernel suites; compared benchmark by benchmark on the median), a cost table
(:mod:`bench.cost_table`; method by method on the median ms per batch, with each run's
ratio to AT) or a training-time table (:mod:`bench.train_time`; median s per batch). Both
files must be of one kind. Prints, for every entry the two runs share, A's and B's time and
``B / A`` (below 1: B is faster), then the entries only one run has. Each run's device,
commit and date head the report, since ratios across devices or loads mean little.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as a file (python bench/compare.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._env import quartiles, table


@dataclass
class Run:
    path: Path
    kind: str                      # "kernels" | "cost-table" | "train-time"
    about: str                     # device, commit, date
    unit: str
    setting: str = ""              # K, M, B, backbone, threads of a table run
    times: dict[str, float] = field(default_factory=dict)
    vs_at: dict[str, float] = field(default_factory=dict)


def _about(device, commit, date) -> str:
    return f"{device or '?'}, commit {str(commit or '?')[:9]}, {date or '?'}"


def load_run(path: str | Path) -> Run:
    """A result file as ``{entry: time}`` with what it is and where it ran."""
    path = Path(path)
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "benchmarks" in data:
        benches = data["benchmarks"]
        info = (benches[0].get("extra_info") or {}) if benches else {}
        device = info.get("device_name") or info.get("device") or data.get("machine_info", {}).get("node")
        run = Run(path, "kernels", _about(device, data.get("commit_info", {}).get("id"), data.get("datetime")), "ms")
        for b in benches:
            run.times[b.get("fullname") or b["name"]] = 1e3 * float(b["stats"]["median"])
        return run
    if isinstance(data, list) and data and isinstance(data[0], dict) and "method" in data[0]:
        r0 = data[0]
        about = _about(r0.get("device_name") or r0.get("device"), r0.get("commit"), r0.get("date"))
        if "ms_per_batch" in r0:
            run = Run(path, "cost-table", about, "ms / batch")
            run.times = {r["method"]: r["ms_per_batch"] for r in data}
        else:
            run = Run(path, "train-time", about, "s / batch")
            run.times = {r["method"]: r["s_per_batch"] for r in data}
        run.setting = ", ".join(f"{k} {r0.get(k)}" for k in ("steps", "members", "batch_size", "backbone", "threads"))
        run.vs_at = {r["method"]: r["ratio_vs_at"] for r in data if r.get("ratio_vs_at") is not None}
        return run
    raise ValueError(f"{path}: not a pytest-benchmark, cost-table or train-time result file")


def _t(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def render(a: Run, b: Run) -> str:
    if a.kind != b.kind:
        raise ValueError(f"cannot compare a {a.kind} file ({a.path}) with a {b.kind} file ({b.path})")
    shared = [k for k in a.times if k in b.times]
    with_at = bool(a.vs_at and b.vs_at)
    rows = []
    for k in shared:
        row = [k.split("::")[-1], _t(a.times[k]), _t(b.times[k]), f"{b.times[k] / a.times[k]:.2f}"]
        if with_at:
            row += [f"{a.vs_at.get(k, float('nan')):.2f}", f"{b.vs_at.get(k, float('nan')):.2f}"]
        rows.append(row)
    header = ["entry", f"A ({a.unit})", f"B ({b.unit})", "B / A"] + (["A: × AT", "B: × AT"] if with_at else [])
    out = [f"# {a.kind}: B / A", "", f"- A: `{a.path}` ({a.about})", f"- B: `{b.path}` ({b.about})", ""]
    if a.setting != b.setting:
        out += [(f"**The settings differ** (A: {a.setting}; B: {b.setting}): B / A mixes the setting with the "
                "machine."), ""]
    if rows:
        ratios = [b.times[k] / a.times[k] for k in shared]
        _, med, _ = quartiles(ratios)
        out += [table(header, rows, right=len(header) - 1), "",
                f"{len(shared)} shared entries; B / A: median {med:.2f}, range {min(ratios):.2f}–{max(ratios):.2f}."]
    else:
        out.append("The two runs share no entry.")
    for name, run, other in (("A", a, b), ("B", b, a)):
        only = [k.split("::")[-1] for k in run.times if k not in other.times]
        if only:
            out += ["", f"Only in {name}: " + ", ".join(only)]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="the baseline run (JSON)")
    ap.add_argument("b", help="the run compared with it (JSON)")
    ap.add_argument("--markdown", metavar="PATH", help="also write the report to PATH")
    args = ap.parse_args(argv)
    try:
        text = render(load_run(args.a), load_run(args.b))
    except ValueError as exc:
        print(f"bench.compare: {exc}", file=sys.stderr)
        return 2
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
