"""CIFAR-10 and CIFAR-100 from the "python version" pickle batches (cifar-10-python.tar.gz,
cifar-100-python.tar.gz, extracted).

The batches are read with an unpickler that only builds numpy arrays, so a data folder
cannot run code through a crafted pickle.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from pyens.data._files import check_split, find_file
from pyens.data.datasets import TensorImageDataset, to_float_images

SUBDIR = "cifar-10-batches-py"
BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and standard deviation of the training pixels (the widely copied std
# (0.2023, 0.1994, 0.2010) is a mean of per-image stds, not the pixel std).
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
EXPECT = (f"--data-dir for cifar10 must hold data_batch_1 .. data_batch_5 and test_batch (the python "
          f"version of CIFAR-10), directly or in {SUBDIR}/")

# What a numpy array pickle (protocol 2 from Python 2, as CIFAR ships, or later ones) needs.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (a {type(batch).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _read_batch(path: Path, label_key: str = "labels", num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 [N, 3, 32, 32], int64 [N])`` of one batch file; CIFAR-100 keeps its labels
    under ``fine_labels``."""
    batch = _unpickle(path)
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: a CIFAR batch needs 'data' and {label_key!r}; found {sorted(batch)}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != data.shape[:1]:
        raise ValueError(f"{path}: expected data [N, 3072] and labels [N]; got {data.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels outside 0..{num_classes - 1} (got {labels.min()}..{labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(directory: Path) -> tuple[str, ...]:
    meta = directory / "batches.meta"
    if not meta.is_file():
        return CLASSES
    names = _unpickle(meta).get("label_names", CLASSES)
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def load_cifar10(split: str, data_dir: str | Path) -> TensorImageDataset:
    """CIFAR-10 ``split`` (50,000 train / 10,000 test images) from ``data_dir``."""
    check_split(split)
    directory = Path(data_dir)
    if (directory / SUBDIR).is_dir():
        directory = directory / SUBDIR
    parts = [_read_batch(find_file(directory, (name,), expect=EXPECT)) for name in BATCHES[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return TensorImageDataset(to_float_images(images), torch.from_numpy(labels), name="cifar10", split=split,
                              classes=_class_names(directory), mean=MEAN, std=STD)


# CIFAR-100, "python version" (cifar-100-python.tar.gz, extracted): files train, test and meta,
# the same pickle format as CIFAR-10's with 100 "fine" labels.
SUBDIR_100 = "cifar-100-python"
# Per-channel statistics of the training pixels as published with CIFAR-100 training code;
# not re-measured here (pyens ships no CIFAR-100). Evaluation does not use them.
MEAN_100, STD_100 = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
EXPECT_100 = (f"--data-dir for cifar100 must hold the files train and test (and meta) of the python version of "
              f"CIFAR-100, directly or in {SUBDIR_100}/")


def load_cifar100(split: str, data_dir: str | Path) -> TensorImageDataset:
    """CIFAR-100 ``split`` (50,000 train / 10,000 test images, 100 fine labels) from ``data_dir``."""
    check_split(split)
    directory = Path(data_dir)
    if (directory / SUBDIR_100).is_dir():
        directory = directory / SUBDIR_100
    images, labels = _read_batch(find_file(directory, (split,), expect=EXPECT_100), "fine_labels", 100)
    classes = tuple(str(i) for i in range(100))
    if (directory / "meta").is_file():
        names = _unpickle(directory / "meta").get("fine_label_names")
        if names is not None and len(names) == 100:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return TensorImageDataset(to_float_images(images), torch.from_numpy(labels), name="cifar100", split=split,
                              classes=classes, mean=MEAN_100, std=STD_100)
