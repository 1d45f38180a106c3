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


class RunDir:
    """The files of the run directory ``path`` (a str or Path)."""

    __slots__ = ("path",)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def eval_json(self) -> Path:
        return self.path / EVAL_JSON

    @property
    def eval_md(self) -> Path:
        return self.path / EVAL_MD

    def missing(self) -> list[str]:
        """The files a trained run needs (config and checkpoint) that are not there."""
        return [name for name in (CONFIG, CHECKPOINT) if not (self.path / name).exists()]
