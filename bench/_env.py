"""What every pyens result file records about the run: device, versions, commit, load.

The cost table and the training-time table put :func:`environment` into each of their JSON
rows (the pytest-benchmark files carry the same facts in ``machine_info`` / ``commit_info``),
so a row read alone still says where and from which code it was measured.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Paths whose uncommitted edits can change a measurement (``dirty`` in the record).
CODE_PATHS = ("pyens", "csrc", "kernels", "bench")


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"``; a CUDA device must be visible."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch.cuda.is_available() is False on this machine "
                         f"(torch {torch.__version__})")
    return dev


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores)"


def _git(*args: str) -> str:
    try:
        return subprocess.run(("git", *args), cwd=ROOT, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict:
    """Device, versions and commit of this run (one flat dict, JSON-ready)."""
    import pyens

    return {
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "pyens": pyens.__version__,
        "commit": _git("rev-parse", "HEAD") or None,
        "dirty": bool(_git("status", "--porcelain", "--", *CODE_PATHS)),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def loadavg() -> float | None:
    """The 1-minute load average (a busy machine inflates CPU timings), if the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def result_path(kind: str, device: str, date: str | None = None) -> Path:
    """``bench/results/<device>-<date>-<kind>.json`` (date: today, UTC)."""
    date = date or datetime.now(timezone.utc).date().isoformat()
    return RESULTS / f"{device}-{date}-{kind}.json"


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) by linear interpolation (numpy's default), for a non-empty list."""
    v = sorted(values)

    def q(p: float) -> float:
        i = p * (len(v) - 1)
        lo = int(i)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (i - lo)

    return q(0.25), q(0.5), q(0.75)


def table(header: list[str], rows: list[list], right=0) -> str:
    """A Markdown table. ``right``: the number of last columns to right-align (numbers), or
    the set of column indices to right-align."""
    cols = set(range(len(header) - right, len(header))) if isinstance(right, int) else set(right)
    align = ["---:" if i in cols else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# the command line shared by the cost table and the training-time table

def add_common_args(ap, *, methods: tuple[str, ...], repeats: int) -> None:
    """The options every table takes: the setting (K, M, backbone, B, device) and the output."""
    ap.add_argument("--steps", type=int, default=10, help="K, PGD steps of the inner maximisation (10)")
    ap.add_argument("--members", type=int, default=3, help="M, sub-models / perturbation types (3)")
    ap.add_argument("--backbone", default="small_cnn", help="backbone of every method (small_cnn)")
    ap.add_argument("--batch-size", type=int, default=100, help="B, examples per batch (100)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu)")
    ap.add_argument("--methods", default=",".join(methods), help=f"comma-separated subset ({','.join(methods)})")
    ap.add_argument("--repeats", type=int, default=repeats, help=f"timed interleaved rounds ({repeats})")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default; 1 is steadiest on a shared, busy CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write the rows (a JSON list) to PATH")
    ap.add_argument("--quiet", action="store_true", help="no per-round progress on stderr")
    ap.add_argument("--render", metavar="PATH", help="measure nothing: print the table of a saved --json file")


def run_table(args, measure, markdown, **extra) -> list[dict]:
    """``measure`` with the common options (and ``extra``), print ``markdown``, write ``--json``."""
    import json

    if args.render:
        rows = json.loads(Path(args.render).read_text())
        print(markdown(rows))
        return rows
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    rows = measure(methods, steps=args.steps, members=args.members, backbone=args.backbone,
                   batch_size=args.batch_size, device=args.device, repeats=args.repeats, seed=args.seed,
                   log=log, **extra)
    print(markdown(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"(rows written to {args.json})", file=sys.stderr)
    return rows


def check_counts(ap, args, names) -> None:
    """``ap.error`` naming the flag unless every ``args.<name>`` is at least 1."""
    for name in names:
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def dump_json(path, obj) -> None:
    """Write a result to ``path`` (no-op when ``path`` is None or empty)."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
