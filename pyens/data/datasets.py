"""The two dataset kinds pyens returns, and the helpers that slice and batch them.

Every dataset yields ``(image, label)`` with ``image`` float32 ``[C, H, W]`` in [0, 1] and
``label`` an int64 scalar, and carries the metadata a model needs: ``mean``/``std`` are applied
INSIDE the model (:class:`pyens.nn.Normalize`), so attacks and their eps stay in pixel space.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pyens.checks import positive_int


class ImageDataset(Dataset):
    """Metadata shared by every pyens dataset.

    Attributes:
        name: ``"mnist"``, ``"cifar10"`` or ``"resisc45"``.
        split: ``"train"`` or ``"test"``.
        classes: class names; ``classes[label]`` names a label.
        num_classes: ``len(classes)``.
        image_shape: ``(C, H, W)`` of every image.
        mean, std: per-channel normalisation constants (length C), for the model's input layer.
    """

    def __init__(self, *, name: str, split: str, classes: Sequence[str], image_shape: Sequence[int],
                 mean: Sequence[float], std: Sequence[float]):
        self.name = name
        self.split = split
        self.classes = tuple(classes)
        self.num_classes = len(self.classes)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def _meta(self) -> dict:
        return {"name": self.name, "split": self.split, "classes": self.classes, "image_shape": self.image_shape,
                "mean": self.mean, "std": self.std}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"image_shape={self.image_shape}, num_classes={self.num_classes})")


class TensorImageDataset(ImageDataset):
    """A dataset held in memory as two tensors.

    Args:
        images: ``[N, C, H, W]`` float32 in [0, 1].
        labels: ``[N]`` int64 in ``[0, len(classes))``.
        **meta: the :class:`ImageDataset` metadata (``image_shape`` is taken from ``images``).

    ``.images`` and ``.labels`` are public so that trainers index whole batches at once
    (:func:`batches`) instead of collating N single items.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, **meta):
        if images.dim() != 4 or images.dtype != torch.float32:
            raise ValueError(f"images must be float32 [N, C, H, W]; got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1] or labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64 [N={images.shape[0]}]; got {labels.dtype} {tuple(labels.shape)}")
        meta["image_shape"] = tuple(images.shape[1:])
        super().__init__(**meta)
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def head(self, n: int) -> TensorImageDataset:
        return TensorImageDataset(self.images[:n], self.labels[:n], **self._meta())


def to_float_images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` (or ``[N, H, W]``, one channel) -> float32 in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(pixels))
    if t.dim() == 3:
        t = t.unsqueeze(1)
    return t.to(torch.float32).div_(255.0)


class ImageFolderDataset(ImageDataset):
    """A lazy dataset of image files, decoded with PIL on every access.

    Args:
        samples: ``(path, label)`` pairs.
        size: images are converted to RGB and resized to ``size x size`` (bilinear, antialiased).
        **meta: the :class:`ImageDataset` metadata (``image_shape`` is ``(3, size, size)``).

    Lazy because decoded float images do not fit in memory (RESISC-45: 31,500 images);
    iterate it through :func:`batches`, which uses a DataLoader (with workers if asked).
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], *, size: int, **meta):
        meta["image_shape"] = (3, size, size)
        super().__init__(**meta)
        self.samples = list(samples)
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return image, torch.tensor(label, dtype=torch.int64)

    def head(self, n: int) -> ImageFolderDataset:
        return ImageFolderDataset(self.samples[:n], size=self.size, **self._meta())


def subset(ds: Dataset, n: int | None) -> Dataset:
    """The first ``n`` examples of ``ds`` (all of them for ``n=None``), metadata kept.

    The papers evaluate on the first 1,000 test images: ``subset(load("cifar10", "test", ...), 1000)``.
    pyens datasets stay pyens datasets (in-memory ones keep ``.images``/``.labels``, as views);
    any other Dataset becomes a ``torch.utils.data.Subset``.
    """
    if n is None:
        return ds
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int or None; got {n!r}")
    if n > len(ds):
        raise ValueError(f"n={n} exceeds the dataset's {len(ds)} examples")
    if isinstance(ds, (TensorImageDataset, ImageFolderDataset)):
        return ds.head(n)
    return torch.utils.data.Subset(ds, range(n))


def batches(ds: Dataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            drop_last: bool = False, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(x [b, C, H, W] float32, y [b] int64)`` batches; every example once.

    Args:
        ds: any map-style dataset of ``(image, label)``.
        batch_size: b (the last batch may be smaller unless ``drop_last``).
        shuffle: visit the examples in a random order drawn from ``generator``.
        generator: the source of the order (a seeded ``torch.Generator`` makes epochs repeatable).
        drop_last: skip the final short batch.
        num_workers: DataLoader workers, used only for datasets without ``.images``/``.labels``
            (lazy ones, where decoding images is the cost).

    Datasets with ``.images``/``.labels`` tensors are indexed directly: a shuffled batch is one
    gather, an ordered batch a view, instead of collating b single items.
    """
    batch_size = positive_int(batch_size, "batch_size")
    images, labels = getattr(ds, "images", None), getattr(ds, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        return _tensor_batches(images, labels, batch_size, shuffle, generator, drop_last)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                        num_workers=num_workers)
    return iter(loader)


def _tensor_batches(images, labels, batch_size, shuffle, generator, drop_last):
    n = labels.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield images[start:start + batch_size], labels[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield images[idx], labels[idx]
