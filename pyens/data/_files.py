"""Finding and checking the files a loader reads: errors say what is missing and what to supply."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) whose MD5 matched this process
SPLITS = ("train", "test")


def check_split(split) -> str:
    """``"train"`` or ``"test"``; every loader checks it, as each one is public."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    return split


def find_file(directory: Path, names: Sequence[str], *, expect: str) -> Path:
    """The first of ``directory/name`` that exists; else FileNotFoundError naming ``names[0]``.

    ``expect`` says what ``--data-dir`` should contain, so the message tells how to fix it.
    """
    for name in names:
        path = directory / name
        if path.is_file():
            return path
    others = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
    raise FileNotFoundError(f"{directory / names[0]} not found{others}; {expect}")


def require_dir(directory: Path, *, expect: str) -> Path:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} not found or not a folder; {expect}")
    return directory


def md5sums(path: Path) -> dict[str, str]:
    """``{file name: md5}`` from an ``md5sum`` output file ("<hash>  <name>" or "<hash> *<name>")."""
    out = {}
    for line in path.read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def verify_md5(path: Path, *, required: bool = False) -> None:
    """Check ``path`` against the ``MD5SUMS`` beside it, once per process per file version.

    A file with no ``MD5SUMS`` beside it, or not listed there, is not checked (user data)
    unless ``required`` (shipped data, whose sums must be there).
    """
    sums_file = path.parent / "MD5SUMS"
    want = md5sums(sums_file).get(path.name) if sums_file.is_file() else None
    if want is None:
        if required:
            raise FileNotFoundError(f"no MD5 sum for {path.name} in {sums_file}; the data folder is incomplete")
        return
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    got = digest.hexdigest()
    if got != want:
        raise ValueError(f"{path} is corrupted: MD5 {got} != {want} listed in {sums_file}; "
                         "restore the file (reinstall pyens for the embedded MNIST set)")
    _VERIFIED.add(key)
