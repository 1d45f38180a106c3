"""RESISC-45 (NWPU-RESISC45, Cheng et al. 2017) from an image-folder tree, decoded lazily.

Layout: ``data_dir/<class_name>/*.jpg|jpeg|png`` (45 class folders, 700 images each), or the
same under ``data_dir/NWPU-RESISC45/``. If ``data_dir`` has ``train/`` and ``test/`` folders,
each laid out that way, they are the splits; otherwise every class is split 80/20 by a fixed
permutation (``numpy.random.RandomState(SPLIT_SEED)``, whose stream numpy keeps frozen), so
the split is the same on every machine and numpy version.

Each split lists its images round-robin over the classes (the first image of every class,
then the second, ...), not class by class: evaluation takes the first n test images (the
papers' protocol), and class by class the first 1,000 would cover only 8 of the 45 classes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pyens.data._files import check_split, require_dir
from pyens.data.datasets import ImageFolderDataset
from pyens.checks import positive_int

SUBDIR = "NWPU-RESISC45"
EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})
DEFAULT_SIZE = 64  # the 256x256 originals are downsampled; 31,500 float images at 256 would need 25 GB
SPLIT_SEED = 0
TRAIN_FRACTION = 0.8
# ImageNet statistics: aerial RGB photographs are close to them, and computing the true
# statistics would decode all 31,500 images on first use.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EXPECT = ("--data-dir for resisc45 must hold one folder per class (45 of them) of .jpg/.png images, "
          f"directly or in {SUBDIR}/, or train/ and test/ folders each laid out that way")


def _class_dirs(root: Path) -> list[Path]:
    require_dir(root, expect=EXPECT)
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(dirs) < 2:
        raise FileNotFoundError(f"{root} has {len(dirs)} class folder(s), at least 2 needed; {EXPECT}")
    return dirs


def _images(class_dir: Path) -> list[Path]:
    files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{class_dir} holds no .jpg/.png images; {EXPECT}")
    return files


def round_robin(per_class: list[list[tuple[Path, int]]]) -> list[tuple[Path, int]]:
    """Class 0's first image, class 1's first, ..., then every class's second, ..."""
    longest = max(map(len, per_class), default=0)
    return [group[i] for i in range(longest) for group in per_class if i < len(group)]


def _split_samples(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    dirs = _class_dirs(root)
    per_class = []
    for label, class_dir in enumerate(dirs):
        files = _images(class_dir)
        order = np.random.RandomState(SPLIT_SEED).permutation(len(files))
        n_train = round(TRAIN_FRACTION * len(files))
        chosen = order[:n_train] if split == "train" else order[n_train:]
        per_class.append([(files[i], label) for i in sorted(chosen)])
    return [d.name for d in dirs], round_robin(per_class)


def _folder_samples(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    train_dirs = _class_dirs(root / "train")
    classes = [d.name for d in train_dirs]
    split_dirs = train_dirs if split == "train" else _class_dirs(root / split)
    if [d.name for d in split_dirs] != classes:
        raise ValueError(f"{root / split} has classes {[d.name for d in split_dirs]}, "
                         f"but {root / 'train'} has {classes}; both splits need the same class folders")
    return classes, round_robin([[(f, label) for f in _images(d)] for label, d in enumerate(split_dirs)])


def load_resisc45(split: str, data_dir: str | Path, *, size: int = DEFAULT_SIZE) -> ImageFolderDataset:
    """RESISC-45 ``split`` from ``data_dir``; images are RGB, resized to ``size x size``."""
    check_split(split)
    size = positive_int(size, "size")
    root = Path(data_dir)
    require_dir(root, expect=EXPECT)
    if (root / SUBDIR).is_dir():
        root = root / SUBDIR
    has = {s: (root / s).is_dir() for s in ("train", "test")}
    if has["train"] and has["test"]:
        classes, samples = _folder_samples(root, split)
    elif has["train"] or has["test"]:
        missing = "test" if has["train"] else "train"
        raise FileNotFoundError(f"{root / missing} not found beside {root / ('train' if has['train'] else 'test')}; "
                                f"{EXPECT}")
    else:
        classes, samples = _split_samples(root, split)
    return ImageFolderDataset(samples, size=size, name="resisc45", split=split, classes=classes, mean=MEAN, std=STD)
