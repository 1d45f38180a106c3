"""Progress display for training and evaluation.

On a terminal: a tqdm bar. Anywhere else (CI, ``pyens train > log 2>&1``): one plain line
every ``PYENS_PROGRESS_SECONDS`` seconds (default 10) and one at the end, instead of the
thousands of ``\\r`` frames a bar writes into a file.
"""
from __future__ import annotations

import os
import sys
import time


def line_seconds() -> float:
    """Seconds between two progress lines when stderr is not a terminal."""
    try:
        return max(0.0, float(os.environ.get("PYENS_PROGRESS_SECONDS", "10")))
    except ValueError:
        return 10.0


def _is_terminal(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def progress(total: int, desc: str, unit: str = "batch", initial: int = 0, file=None):
    """A progress display with tqdm's ``update``, ``set_postfix``, ``set_postfix_str`` and ``close``."""
    file = sys.stderr if file is None else file
    if _is_terminal(file):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=True, file=file)
    return LineProgress(total, desc, unit, initial=initial, file=file)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class LineProgress:
    """Progress as plain lines: ``desc: 120/540 batch (22%), 0:31 elapsed, 3.9 batch/s, eta 1:48, loss=...``,
    at most one every ``interval`` seconds, and one when closed."""

    def __init__(self, total: int | None, desc: str, unit: str = "batch", *, initial: int = 0, file=None,
                 interval: float | None = None, clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.file = sys.stderr if file is None else file
        self.interval = line_seconds() if interval is None else interval
        self.clock = clock
        self.start_n, self.t0 = initial, clock()
        self.last, self.postfix, self.closed = self.t0, "", False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(self.clock())

    def _line(self, now: float) -> None:
        elapsed = now - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{_clock(elapsed)} elapsed")
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"eta {_clock((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        print(f"{self.desc}: {', '.join(parts)}", file=self.file, flush=True)
