"""MNIST from IDX files: the embedded test set (the default) and full MNIST from IDX files.

The embedded set is the real MNIST test set (10,000 images, ``pyens/data/mnist/``), split as
the papers use it: the first 1,000 images are the evaluation set ("test"), the last 9,000 the
training set ("train"). MNIST: Y. LeCun, C. Cortes, C. Burges, CC BY-SA 3.0.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from pyens.data._files import check_split, find_file, verify_md5
from pyens.data.datasets import TensorImageDataset, to_float_images

EMBEDDED_DIR = Path(__file__).resolve().parent / "mnist"
EMBEDDED_TEST = 1000  # the papers evaluate on the first 1,000 test images
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = tuple(str(d) for d in range(10))
MEAN, STD = (0.1307,), (0.3081,)
EXPECT = ("--data-dir for mnist must hold the IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
          "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each may be .gz); omit --data-dir for the "
          "embedded 10,000-image set")

# IDX type codes (yann.lecun.com/exdb/mnist): the data is big-endian.
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed when the name ends in ``.gz``)."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not readable as {'gzip' if path.suffix == '.gz' else 'IDX'} ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"{path}: IDX header says shape {shape} ({count * dtype.itemsize} bytes) but "
                         f"{len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _read_pair(directory: Path, split: str, *, require_md5: bool = False) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for name in FILES[split]:
        names = (name, name + ".gz", name.replace("-idx", ".idx"), name.replace("-idx", ".idx") + ".gz")
        path = find_file(directory, names, expect=EXPECT)
        verify_md5(path, required=require_md5)
        arrays.append(read_idx(path))
    images, labels = arrays
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{directory / FILES[split][0]}: expected uint8 images [N, H, W]; got "
                         f"{images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{directory}: {images.shape[0]} images but labels of shape {labels.shape} "
                         f"for split {split!r}")
    if labels.size and labels.max() >= len(CLASSES):
        raise ValueError(f"{directory / FILES[split][1]}: label {labels.max()} outside 0..9")
    return images, labels


def _dataset(images: np.ndarray, labels: np.ndarray, split: str) -> TensorImageDataset:
    return TensorImageDataset(to_float_images(images), torch.from_numpy(labels.astype(np.int64)),
                              name="mnist", split=split, classes=CLASSES, mean=MEAN, std=STD)


def load_mnist(split: str, data_dir: str | Path) -> TensorImageDataset:
    """Full MNIST from ``data_dir`` (60,000 train / 10,000 test images)."""
    images, labels = _read_pair(Path(data_dir), check_split(split))
    return _dataset(images, labels, split)


def load_embedded_mnist(split: str, *, root: str | Path = EMBEDDED_DIR) -> TensorImageDataset:
    """The embedded set: ``"test"`` = the first 1,000 images, ``"train"`` = the last 9,000.

    ``root`` holds ``t10k-*-ubyte.gz`` and ``MD5SUMS``; the files are checked against it on
    the first load in a process (a corrupted file raises ValueError naming it).
    """
    check_split(split)
    images, labels = _read_pair(Path(root), "test", require_md5=True)
    part = slice(None, EMBEDDED_TEST) if split == "test" else slice(EMBEDDED_TEST, None)
    return _dataset(images[part], labels[part], split)
