"""The layout of a training run directory, in one place.

A run directory holds ``config.toml`` (the resolved config, written first: it claims the
directory), ``checkpoint.pt`` (weights and everything ``--resume`` needs, rewritten atomically),
``metrics.jsonl`` (one record per epoch) and, once evaluated, ``eval.json`` / ``eval.md``.
Every module finds these files through :class:`RunDir`, never by spelling their names.
"""
from __future__ import annotations

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
