"""Atomic checkpoints that resume a run exactly, RNG streams included, and load without running code.

A checkpoint holds only what ``torch.load(weights_only=True)`` accepts: tensors and plain
Python values (dicts, lists, tuples, str, int, float, bool, None). Trained runs are made to be
shared, and a full unpickle runs whatever a file's pickle names (``os.system`` included), so
every loader in pyens uses :func:`load`, which loads with ``weights_only=True``. The one full
unpickling in the package is :func:`convert`, behind ``pyens convert-checkpoint RUN --trust``,
for checkpoints written by earlier versions (they held NumPy's RNG state as a NumPy array).
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from pyens.atomic_files import atomic_write
from pyens.training.run_dir import CHECKPOINT  # noqa: F401  (the file name, re-exported)

BACKUP_SUFFIX = ".orig"  # convert() keeps the file it converted as checkpoint.pt.orig (.orig-2, ...)

# Test hook (tests/test_kill_resume.py): seconds to sleep inside atomic_save after the bytes
# are written to the temporary file and before they are flushed and renamed into place, so
# that a SIGKILL can land inside a checkpoint write. Unset in normal use.
SLOW_WRITE_ENV = "PYENS_TEST_SLOW_CHECKPOINT_WRITE"


class UnsafeCheckpointError(ValueError):
    """A checkpoint that needs more than ``weights_only`` loading allows; ``.global_name`` says what."""

    def __init__(self, message: str, path: Path, global_name: str):
        super().__init__(message)
        self.path, self.global_name = path, global_name


# -- RNG state as tensors and plain values ------------------------------------------------------
def _numpy_state(state: tuple) -> dict:
    """``np.random.get_state()``'s tuple as plain values (the uint32 key as an int64 tensor)."""
    name, key, pos, has_gauss, cached_gaussian = state[:5]
    return {"name": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _numpy_tuple(state: dict) -> tuple:
    key = state["key"].cpu().numpy().astype(np.uint32)
    return state["name"], key, state["pos"], state["has_gauss"], state["cached_gaussian"]


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG stream a run draws from, in a form ``weights_only`` loading accepts."""
    # random.getstate() is (version, tuple of 625 ints, gauss_next): plain values already.
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
             "python": random.getstate(), "numpy": _numpy_state(np.random.get_state())}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    # .cpu(): a checkpoint loaded with map_location="cuda" has its byte states on the GPU.
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["generator"].cpu())
    random.setstate(state["python"])
    np.random.set_state(_numpy_tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# -- atomic writes -------------------------------------------------------------------------------
def _slow_write_hook() -> None:
    if os.environ.get(SLOW_WRITE_ENV):
        time.sleep(float(os.environ[SLOW_WRITE_ENV]))  # test hook only: see SLOW_WRITE_ENV


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically (:func:`pyens.atomic_files.atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f), before_rename=_slow_write_hook)


# -- loading -------------------------------------------------------------------------------------
def _refused_global(exc: BaseException) -> str | None:
    """The global a weights-only unpickle refused, from torch's message, else None.

    torch words it "Unsupported global: GLOBAL numpy...._reconstruct ..." or "Trying to load
    unsupported GLOBAL posix.system whose module posix is blocked".
    """
    text = str(exc)
    if "Weights only load failed" not in text:
        return None
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return match.group(1)
    match = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return match.group(1).strip() if match else "an object weights-only loading refuses"


def _run_arg(path: Path) -> Path:
    return path.parent if path.name == CHECKPOINT else path


def load(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint written by :func:`atomic_save`, loaded with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError (a ValueError): the file needs a global that weights-only
            loading refuses (an earlier version's NumPy RNG state, or anything else); the
            message names the file and the global, and nothing of the file has run.
        ValueError: the file is empty, truncated or not a checkpoint; the message names it.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - weights-only unpickling runs no code; any failure is the file's
        name = _refused_global(exc) if isinstance(exc, pickle.UnpicklingError) else None
        if name is not None:
            raise UnsafeCheckpointError(
                f"checkpoint: {path} needs {name}, which safe (weights-only) loading refuses; nothing "
                "of the file was run. pyens checkpoints hold only tensors and plain values. One written "
                "by an earlier pyens version holds NumPy objects: if you trust the file, convert it once "
                f"with `pyens convert-checkpoint {_run_arg(path)} --trust` (that unpickles it fully, "
                "which runs whatever it holds)", path, name) from None
        why = "an empty file" if path.stat().st_size == 0 else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"checkpoint: {path} is not a readable checkpoint ({why})") from exc


# -- converting checkpoints of earlier versions ---------------------------------------------------
def _plain(obj):
    """``obj`` with NumPy arrays as tensors and NumPy scalars as Python numbers.

    Containers with nothing to change are returned as they are (a state_dict keeps its
    ``_metadata``).
    """
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        items = [(k, _plain(v)) for k, v in obj.items()]
        if all(new is obj[k] for k, new in items):
            return obj
        out = OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        items = [_plain(v) for v in obj]
        if all(new is old for new, old in zip(items, obj)):
            return obj
        return tuple(items) if isinstance(obj, tuple) else items
    return obj


def _safe_state(state: dict) -> dict:
    state = dict(state)
    rng = state.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):  # np.random.get_state()
        state["rng"] = {**rng, "numpy": _numpy_state(rng["numpy"])}
    return _plain(state)


def _backup_path(path: Path) -> Path:
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    n = 2
    while backup.exists():
        backup, n = path.with_name(f"{path.name}{BACKUP_SUFFIX}-{n}"), n + 1
    return backup


def convert(run_dir_or_file: str | Path, trust: bool) -> Path | None:
    """Rewrite a checkpoint of an earlier pyens version in the safe format (``pyens convert-checkpoint``).

    A checkpoint that already loads with ``weights_only=True`` is left alone (returns None).
    Otherwise, without ``trust`` this refuses (ValueError) and nothing of the file is loaded.
    With ``trust`` it warns, unpickles the file fully (``weights_only=False``, the only place
    in pyens that does: it runs whatever the file holds), turns NumPy values into tensors and
    plain values, checks that the result loads with ``weights_only=True``, keeps the original
    as ``checkpoint.pt.orig`` (``.orig-2``, ... if taken: nothing is lost, and nothing loads
    that name) and replaces the checkpoint atomically. Returns the backup's path.
    """
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"convert-checkpoint: no checkpoint file {path}")
    try:
        load(path)
        return None
    except UnsafeCheckpointError as exc:
        refused = exc.global_name
    if not trust:
        raise ValueError(
            f"convert-checkpoint: {path} needs {refused}, so converting it means unpickling it fully, "
            "which runs whatever code the file holds. Nothing was loaded. Pass --trust only for a "
            "file you trust (e.g. one you trained with an earlier pyens version)")
    warnings.warn(f"convert-checkpoint: unpickling {path} fully (weights_only=False, trusted): this runs "
                  f"whatever the file holds ({refused} at least)", UserWarning, stacklevel=2)
    # The one full unpickling in pyens, reached only with trust=True.
    state = torch.load(path, map_location="cpu", weights_only=False)
    buffer = io.BytesIO()
    torch.save(_safe_state(state), buffer)
    try:
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"convert-checkpoint: {path} holds {_refused_global(exc) or exc}, which has no "
                         "safe form; it was not converted") from None
    backup = _backup_path(path)
    with open(path, "rb") as src:
        atomic_write(backup, lambda f: shutil.copyfileobj(src, f))
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return backup
