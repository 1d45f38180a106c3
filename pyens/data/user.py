"""A user's own evaluation images: an ``.npz`` of arrays, or an image folder with one
subfolder per class. Both become a :class:`TensorImageDataset` (float32 ``[N, C, H, W]`` in
[0, 1], int64 labels ``[N]``); every check names the file and what is wrong with it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pyens.data.datasets import TensorImageDataset, to_float_images
from pyens.data.resisc import round_robin  # the first n examples then cover every class

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
NPZ_EXPECT = ("an .npz for --data holds x: images [N, C, H, W], float in [0, 1] (or uint8 0..255), and y: integer "
              "labels [N] (optionally classes: [K] names); save it with np.savez(path, x=x, y=y)")


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``images [N, C, H, W]`` (the dataset metadata; unused by evaluation)."""
    flat = images.transpose(0, 1).flatten(1).double()
    return tuple(flat.mean(1).tolist()), tuple(flat.std(1).clamp_min(1e-6).tolist())


def _labels(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{where}: y must be labels [N={n}], got shape {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: y must hold integer class indices, got dtype {y.dtype}")
    if n and y.min() < 0:
        raise ValueError(f"{where}: y must hold class indices >= 0, got {int(y.min())}")
    return torch.from_numpy(y.astype(np.int64))


def load_npz(path: str | Path, name: str | None = None) -> TensorImageDataset:
    """Images and labels from ``np.savez(path, x=x, y=y)``.

    Args:
        path: the ``.npz`` file: ``x`` ``[N, C, H, W]`` float in [0, 1] (uint8 is divided by 255),
            ``y`` ``[N]`` integers >= 0, optionally ``classes`` ``[K]`` strings. Read with
            ``allow_pickle=False``: the file cannot run code.
        name: the dataset's name (default: the file's stem).

    Raises FileNotFoundError for a missing file and ValueError naming the array that is wrong
    (missing key, shape, dtype, range, NaN).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file; {NPZ_EXPECT}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise ValueError(f"--data {path}: cannot read it without pickle ({exc}); {NPZ_EXPECT}") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"--data {path}: not an .npz archive ({exc}); {NPZ_EXPECT}") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ValueError(f"--data {path}: no array {' or '.join(missing)} (it holds {sorted(arrays)}); {NPZ_EXPECT}")
    x, y = arrays["x"], arrays["y"]
    where = f"--data {path}"
    if x.ndim != 4:
        raise ValueError(f"{where}: x must be images [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        raise ValueError(f"{where}: x of shape {tuple(x.shape)} looks channels-last [N, H, W, C]; save "
                         "x.transpose(0, 3, 1, 2), i.e. [N, C, H, W]")
    if len(x) == 0:
        raise ValueError(f"{where}: x holds no images")
    if x.dtype == np.uint8:
        images = to_float_images(x)
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise ValueError(f"{where}: x holds NaN or infinity")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            hint = " (0..255 pixels: divide by 255)" if hi > 1.5 else " (normalized images: save the pixels, and " \
                   "give the model --normalize mean=...,std=...)"
            raise ValueError(f"{where}: x must hold pixels in [0, 1], got values in [{lo:g}, {hi:g}]{hint}")
        images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        raise ValueError(f"{where}: x must be float in [0, 1] or uint8, got dtype {x.dtype}")
    labels = _labels(y, len(x), where)
    k = int(labels.max()) + 1
    classes = tuple(str(i) for i in range(k))
    if "classes" in arrays:
        names = arrays["classes"]
        if names.ndim != 1 or len(names) < k:
            raise ValueError(f"{where}: classes must name every label 0..{k - 1}, got shape {tuple(names.shape)}")
        classes = tuple(str(c) for c in names)
    mean, std = _stats(images)
    return TensorImageDataset(images, labels, name=name or path.stem, split="test", classes=classes, mean=mean,
                              std=std)


def load_image_folder(root: str | Path, *, size: tuple[int, int] | None = None, n: int | None = None,
                      name: str | None = None) -> TensorImageDataset:
    """Images from ``root/<class name>/<image>`` (classes in sorted order of their folder names).

    Args:
        root: the folder; every subfolder is a class (at least 2), holding image files
            (``.png``, ``.jpg``, ...).
        size: ``(H, W)``: resize every image (bilinear, antialiased); None: every image must
            already have the same size.
        n: decode only the first ``n`` images, listed round-robin over the classes (class 0's
            first, class 1's first, ..., then the second of each), so they cover every class.
        name: the dataset's name (default: the folder's name).

    Images are grayscale (1 channel) when every one of them is, else RGB (3 channels).
    Raises FileNotFoundError (no folder, no classes, an empty class) or ValueError naming the
    file that cannot be decoded or whose size differs.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root).expanduser()
    expect = "an image folder for --data holds one subfolder per class (at least 2), each with image files"
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder; {expect}")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(dirs) < 2:
        raise FileNotFoundError(f"--data {root}: {len(dirs)} class folder(s), at least 2 needed; {expect}")
    per_class = []
    for label, d in enumerate(dirs):
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"--data {root}: class folder {d.name}/ holds no images "
                                    f"({', '.join(sorted(IMAGE_EXTENSIONS))}); {expect}")
        per_class.append([(f, label) for f in files])
    samples = round_robin(per_class)[:n]
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"--resize must be H or HxW with sizes >= 1, got {size}")
    pictures, first = [], None
    for path, _ in samples:
        try:
            with Image.open(path) as img:
                img.load()
                img = img.convert("L" if img.mode in ("1", "L", "I;16", "I") else "RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"--data {root}: cannot decode {path.relative_to(root)} ({exc})") from None
        if size is not None:
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        elif first is None:
            first = (path, img.size)
        elif img.size != first[1]:
            raise ValueError(f"--data {root}: {path.relative_to(root)} is {img.size[0]}x{img.size[1]} but "
                             f"{first[0].relative_to(root)} is {first[1][0]}x{first[1][1]} (width x height); give "
                             "--resize H or HxW")
        pictures.append(img)
    rgb = any(p.mode == "RGB" for p in pictures)
    arrays = [np.asarray(p.convert("RGB") if rgb else p, dtype=np.uint8) for p in pictures]
    stacked = np.stack(arrays)  # [N, H, W, 3] or [N, H, W]
    images = to_float_images(stacked.transpose(0, 3, 1, 2) if rgb else stacked)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    mean, std = _stats(images)
    return TensorImageDataset(images, labels, name=name or root.name, split="test",
                              classes=tuple(d.name for d in dirs), mean=mean, std=std)
