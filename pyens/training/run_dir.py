"""The layout of a training run directory, in one place.

A run directory holds ``config.toml`` (the resolved config, written first: it claims the
directory), ``checkpoint.pt`` (weights and everything ``--resume`` needs, rewritten atomically),
``metrics.jsonl`` (one record per epoch) and, once evaluated, ``eval.json`` / ``eval.md``.
Every module finds these files through :class:`RunDir`, never by spelling their names.
"""
from __future__ import annotations

import os
from pathlib import Path

CONFIG = "config.toml"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"


def _file(name: str) -> property:
    return property(lambda self: self.path / name, doc=f"``{name}`` in the run directory")


class RunDir:
    """The files of the run directory ``path`` (a str or Path)."""

    __slots__ = ("path",)

    config = _file(CONFIG)
    checkpoint = _file(CHECKPOINT)
    metrics = _file(METRICS)
    eval_json = _file(EVAL_JSON)
    eval_md = _file(EVAL_MD)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def missing(self) -> list[str]:
        """The files a trained run needs (config and checkpoint) that are not there."""
        return [name for name in (CONFIG, CHECKPOINT) if not (self.path / name).exists()]

    def claim(self, config_text: str) -> bool:
        """Create the config file with ``config_text`` if no run holds the directory; whether
        this call did (two runs started together never share a directory).

        The config goes into the claimed file at once, so a run killed before its first
        checkpoint (while loading data, say) leaves a config that ``--resume`` can start from.
        A run that fails to start gives the claim back (:meth:`release`).
        """
        if self.checkpoint.exists():  # a run from before directories were claimed
            return False
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.config, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(config_text)
        return True

    def release(self, *, remove_dir: bool) -> None:
        """Undo :meth:`claim` for a run that failed to start: the config and an empty metrics
        file go, and the directory too when ``remove_dir`` and it is now empty."""
        if self.checkpoint.exists():  # never the case before training: be safe anyway
            return
        self.config.unlink(missing_ok=True)
        if self.metrics.exists() and self.metrics.stat().st_size == 0:
            self.metrics.unlink()
        if remove_dir:
            try:
                self.path.rmdir()  # only if empty
            except OSError:
                pass
