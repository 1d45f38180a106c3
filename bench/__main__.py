"""All of pyens's benchmarks in one command: ``python -m bench`` (or ``make bench``).

1. every ``bench/bench_<op>.py`` suite (pytest-benchmark) ->
   ``bench/results/<device>-<date>-<op>.json``;
2. the Table 6 cost table (:mod:`bench.cost_table`) -> ``<device>-<date>-cost-table.json``;
3. the Table 7 training-time table (:mod:`bench.train_time`) -> ``<device>-<date>-train-time.json``;
4. the benchmark block of docs/performance.md (:mod:`bench.readme`) from the newest result of each device,
   with the kernel-speedup chart ``bench/results/kernel-speedups-<device>.png``.

Each step runs in its own process; a failing suite is reported and the others still run
(the exit status is then 1). ``--skip kernels,train`` leaves steps out (the README is then
refreshed from the results already there); ``--quick`` is a smoke run at tiny K, B and
repeats. On a GPU machine: ``python -m bench --device cuda``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench._env import RESULTS, ROOT

STEPS = ("kernels", "cost", "train", "readme")


def suites() -> list[Path]:
    """The kernel benchmark suites: every ``bench/bench_*.py``."""
    return sorted((ROOT / "bench").glob("bench_*.py"))


def _run(cmd: list[str], what: str) -> bool:
    print(f"\n== {what}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    print(f"== {what}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.monotonic() - t0:.0f} s", flush=True)
    return rc == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    ap.add_argument("--date", default=datetime.now(timezone.utc).date().isoformat(),
                    help="date in the result names (today, UTC)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the JSON files go (bench/results)")
    ap.add_argument("--readme", type=Path, default=ROOT / "docs" / "performance.md",
                    help="the file holding the generated benchmark block (default: %(default)s)")
    ap.add_argument("--skip", default="", help=f"comma-separated steps to leave out, of {','.join(STEPS)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for the tables (1, as the committed CPU results; 0: torch's default)")
    ap.add_argument("--steps", type=int, default=10, help="K for the tables (10)")
    ap.add_argument("--members", type=int, default=3, help="M for the tables (3)")
    ap.add_argument("--batch-size", type=int, default=100, help="B for the tables (100)")
    ap.add_argument("--quick", action="store_true", help="smoke run: K = 2, B = 16, one timed round")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(STEPS):
        ap.error(f"--skip: unknown steps {sorted(skip - set(STEPS))}; steps are {', '.join(STEPS)}")
    dev = args.device.split(":")[0]
    prefix = args.results / f"{dev}-{args.date}"
    args.results.mkdir(parents=True, exist_ok=True)
    py = [sys.executable]
    ok = True

    if "kernels" not in skip:
        for suite in suites():
            op = suite.stem.removeprefix("bench_")
            ok &= _run(py + ["-m", "pytest", str(suite.relative_to(ROOT)), "--benchmark-only", "-q",
                             "-p", "no:cacheprovider", "--device", dev,
                             f"--benchmark-json={prefix}-{op}.json"], f"kernel suite {suite.name}")
    table = ["--steps", str(2 if args.quick else args.steps), "--members", str(args.members),
             "--batch-size", str(16 if args.quick else args.batch_size), "--device", args.device,
             "--threads", str(args.threads)]
    if "cost" not in skip:
        ok &= _run(py + ["-m", "bench.cost_table", *table, "--repeats", "1" if args.quick else "15",
                         "--warmup", "1" if args.quick else "2", "--profile", "--json", f"{prefix}-cost-table.json"],
                   "Table 6: cost table")
    if "train" not in skip:
        ok &= _run(py + ["-m", "bench.train_time", *table, "--repeats", "1" if args.quick else "3",
                         "--batches", "2" if args.quick else "5", "--json", f"{prefix}-train-time.json"],
                   "Table 7: training time")
    if "readme" not in skip:
        from bench.readme import refresh

        changed = refresh(args.readme, args.results)
        print(f"\n== {args.readme}: benchmark block {'refreshed' if changed else 'unchanged'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
