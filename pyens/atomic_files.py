"""Writes that a crash cannot leave half done: one implementation for every file pyens writes.

Run directories, evaluation caches and the self-check cache are read back by later processes,
so a kill -9 in the middle of a write must leave either the old file or the new one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], *,
                 before_rename: Callable[[], None] | None = None) -> None:
    """Call ``write(binary_file)`` so that a crash leaves either the old ``path`` or the new one.

    The bytes go to a temporary file in the same directory, are flushed to disk, and the file
    is renamed over ``path`` (``os.replace`` is atomic within one filesystem). A unique
    temporary name (``mkstemp``) keeps two writers of one path from sharing it. A kill -9
    leaves at most a stray ``.<name>.*.tmp`` beside ``path``, never a partial ``path``.
    ``before_rename`` runs once the bytes are written and before the rename (a test hook).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; these are ordinary files
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if before_rename is not None:
                before_rename()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    """``Path(path).write_text(text)`` in UTF-8, atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def remove_stray_temporaries(path: str | Path) -> None:
    """Delete the ``.<name>.*.tmp`` files that writes of ``path`` killed mid-way left behind."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
