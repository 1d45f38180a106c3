"""Markdown report of a ``bench_lp_step.py`` run.

Usage::

    python -m bench.report RESULTS.json [--markdown [PATH]]

Reads the ``--benchmark-json`` file of pytest-benchmark and prints Markdown tables:

1. the step: shape, norm, projection, provider, median (ms), min (ms: the fastest round,
   a check on noise), GB/s (from the median) and the speedup
   ``peer median / provider median`` (the peer of the same shape and norm);
2. copy bandwidth at each shape's step size, and the fraction of it each provider's
   linf step reaches (linf is the purely memory-bound step);
3. the MAT layout: one mixed-norm launch against the sum of the three single-norm
   launches on the same member rows (``sum / mixed`` > 1: the mixed launch is faster).

Every median and ratio comes from the one JSON file, i.e. the same run.  GB/s counts
16 bytes per float32 element (read x, delta, grad; write delta).  ``--markdown`` also
writes the report to PATH (default: the JSON path with ``.md``).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

_NORM_ORDER = {"linf": 0, "l2": 1, "l1": 2}
_NUMERIC = ("rounds", "MB moved")
_NOISY = 1.5  # median / min above this marks a disturbed timing
_PROVIDER_ORDER = {"cuda": 0, "triton": 1, "cpu": 2, "reference": 3, "peer": 9}


def _shape_key(name: str):
    # row shapes first, by size; then the MAT layouts
    return (name.startswith("mat-"), name.startswith("mat-cifar"), "cifar" in name,
            int(name.split("-")[-1].split("x")[0]))


def _prov_key(p: str):
    return (_PROVIDER_ORDER.get(p, 5), p)


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if h.endswith(("(ms)", "GB/s", " x", " %")) or h in _NUMERIC
                              else "---" for h in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _gbs(nbytes, s) -> float:
    return nbytes / s / 1e9


def load(path: str | Path) -> dict:
    with open(path) as f:
        return json.load(f)


def records(data: dict) -> list[dict]:
    """One flat record per benchmark: its extra_info plus median and rounds."""
    out = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        if "group" not in info or "provider" not in info:
            continue  # not from bench_lp_step.py
        info["median"] = float(b["stats"]["median"])
        info["min"] = float(b["stats"]["min"])
        info["rounds"] = int(b["stats"]["rounds"])
        info["name"] = b.get("name", "")
        out.append(info)
    return out


def render(data: dict) -> str:
    recs = records(data)
    if not recs:
        return "No bench_lp_step.py results in this file.\n"
    first = recs[0]
    out = []
    out.append(f"# lp step benchmark: {first.get('device', '?')} ({first.get('device_name', '?')})")
    out.append("")
    out.append(f"Run {data.get('datetime', '?')}; torch {first.get('torch', '?')}, "
               f"{first.get('threads', '?')} threads, dtype {first.get('dtype', '?')}, k = {first.get('k', '?')}. "
               "Median of each benchmark's rounds; GB/s counts 16 B per element "
               "(read x, delta, grad; write delta). Speedup = peer median / provider median, "
               "same shape and norm, same run.")
    loads = [r["loadavg_1m"] for r in recs if r.get("loadavg_1m") is not None]
    if loads and first.get("device") == "cpu":
        cpus = first.get("cpus") or 1
        note = (" The machine was busy with other work: CPU medians are inflated and noisy."
                if max(loads) > cpus + 0.5 else "")  # the run's own threads count too
        out.append(f"1-minute load average while benchmarking: {min(loads):.2f} to {max(loads):.2f} "
                   f"on {cpus} CPUs.{note}")
        out.append("")

    # ---- 1. the step (rows and the mixed MAT launch)
    steps = [r for r in recs if r["group"] in ("step", "members")]
    peer = {(r["shape"], r["norm"]): r["median"] for r in steps if r["provider"] == "peer"}
    rows = []
    for r in sorted(steps, key=lambda r: (_shape_key(r["shape"]), r["group"] == "members",
                                          _NORM_ORDER.get(r["norm"], 9), r["projection"] != "exact",
                                          _prov_key(r["provider"]))):
        p = peer.get((r["shape"], r["norm"]))
        speed = f"{p / r['median']:.2f}" if p else "-"
        norm = r["norm"] if r["group"] == "step" else f"mixed ({r['norm']})"
        noisy = " †" if r["median"] > _NOISY * r["min"] else ""
        rows.append([r["shape"], norm, r["projection"], r["provider"], _ms(r["median"]) + noisy, _ms(r["min"]),
                     f"{_gbs(r['bytes'], r['median']):.1f}", speed, r["rounds"]])
    out.append("## Step")
    out.append("")
    out.append("Peer conventions: linf and l1 exact, l2 sequential (torchattacks); the l2 "
               "`exact` rows are the product's default and do more work than the peer. "
               f"† median over {_NOISY:g}x the fastest round: that timing was disturbed, rerun it.")
    out.append("")
    out.append(_table(["shape", "norm", "projection", "provider", "median (ms)", "min (ms)", "GB/s",
                       "speedup x", "rounds"], rows))
    out.append("")

    # ---- 2. copy bandwidth and the fraction of it reached by linf
    copies = {r["shape"]: r for r in recs if r["group"] == "copy"}
    linf = [r for r in recs if r["group"] == "step" and r["norm"] == "linf"]
    if copies:
        rows = []
        for shape in sorted(copies, key=_shape_key):
            c = copies[shape]
            cbw = _gbs(c["bytes"], c["median"])
            these = sorted((r for r in linf if r["shape"] == shape), key=lambda r: _prov_key(r["provider"]))
            if not these:
                rows.append([shape, f"{c['bytes'] / 1e6:.1f}", _ms(c["median"]), f"{cbw:.1f}", "-", "-", "-"])
            for r in these:
                bw = _gbs(r["bytes"], r["median"])
                rows.append([shape, f"{c['bytes'] / 1e6:.1f}", _ms(c["median"]), f"{cbw:.1f}",
                             r["provider"], f"{bw:.1f}", f"{100 * bw / cbw:.0f}"])
        out.append("## Copy bandwidth and linf")
        out.append("")
        out.append("`dst.copy_(src)` moving as many bytes as one step (read + write counted).")
        out.append("")
        out.append(_table(["shape", "MB moved", "copy median (ms)", "copy GB/s", "linf provider",
                           "linf GB/s", "of copy %"], rows))
        out.append("")

    # ---- 3. mixed-member launch vs the sum of three single-norm launches
    mixed = [r for r in recs if r["group"] == "members"]
    singles = defaultdict(dict)
    for r in recs:
        if r["group"] == "member-rows":
            singles[(r["shape"], r["provider"])][r["norm"]] = r["median"]
    if mixed:
        rows = []
        for r in sorted(mixed, key=lambda r: (_shape_key(r["shape"]), _prov_key(r["provider"]))):
            parts = singles.get((r["shape"], r["provider"]), {})
            norms = r["norm"].split(",")
            if all(n in parts for n in norms):
                total = sum(parts[n] for n in norms)
                split = " + ".join(_ms(parts[n]) for n in norms)
                rows.append([r["shape"], r["provider"], _ms(r["median"]), f"{split} = {_ms(total)}",
                             f"{total / r['median']:.2f}"])
            else:
                rows.append([r["shape"], r["provider"], _ms(r["median"]), "-", "-"])
        out.append("## MAT layout: one mixed launch vs three single-norm launches")
        out.append("")
        out.append(f"Members ({first_norms(mixed)}) of `[B, 3, n]`; the singles run on each member's "
                   "rows as contiguous `[B, n]`. The peer's mixed row is its per-member loop.")
        out.append("")
        out.append(_table(["shape", "provider", "mixed (ms)", "singles (ms)", "sum / mixed x"], rows))
        out.append("")
    return "\n".join(out)


def first_norms(mixed) -> str:
    return mixed[0]["norm"].replace(",", ", ")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="pytest-benchmark --benchmark-json file")
    ap.add_argument("--markdown", nargs="?", const="", default=None, metavar="PATH",
                    help="also write the Markdown to PATH (default: RESULTS with .md)")
    args = ap.parse_args(argv)
    text = render(load(args.results))
    print(text)
    if args.markdown is not None:
        path = Path(args.markdown) if args.markdown else Path(args.results).with_suffix(".md")
        path.write_text(text + "\n")
        print(f"(written to {path})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
