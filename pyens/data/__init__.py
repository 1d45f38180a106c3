"""Datasets for pyens: MNIST (embedded or full), CIFAR-10/100 and RESISC-45, read from local files;
a user's own images as an ``.npz`` or an image folder (:mod:`pyens.data.user`).

    ds = pyens.data.load("mnist", "train")                       # embedded: last 9,000 test images
    ds = pyens.data.load("cifar10", "test", data_dir="~/data")   # cifar-10-batches-py pickles
    for x, y in pyens.data.batches(ds, 128, shuffle=True, generator=g): ...

Every dataset yields ``(image float32 [C, H, W] in [0, 1], label int64)`` and carries
``name``, ``split``, ``num_classes``, ``classes``, ``image_shape`` (C, H, W) and per-channel
``mean``/``std`` for the normalisation layer inside the model (pixels stay in [0, 1], so
attack radii are in pixel units). MNIST and CIFAR-10 are held in memory and also expose
``.images [N, C, H, W]`` and ``.labels [N]``; RESISC-45 is decoded lazily. Nothing is ever
downloaded: a missing file raises FileNotFoundError naming it and what ``--data-dir`` needs.
"""
from __future__ import annotations

from pathlib import Path

from pyens.data import cifar, resisc
from pyens.data._files import SPLITS, check_split
from pyens.data.cifar import load_cifar10, load_cifar100
from pyens.data.datasets import ImageDataset, ImageFolderDataset, TensorImageDataset, batches, subset
from pyens.data.mnist_idx import load_embedded_mnist, load_mnist, read_idx
from pyens.data.resisc import DEFAULT_SIZE, load_resisc45
from pyens.data.user import load_image_folder, load_npz

NAMES = ("mnist", "cifar10", "cifar100", "resisc45")


def load(name: str, split: str = "train", *, data_dir: str | Path | None = None,
         size: int | None = None) -> ImageDataset:
    """The ``split`` of dataset ``name``.

    Args:
        name: ``"mnist"``, ``"cifar10"``, ``"cifar100"`` or ``"resisc45"``.
        split: ``"train"`` or ``"test"``.
        data_dir: the folder holding the dataset in its standard format. ``None`` is allowed
            for ``"mnist"`` only and gives the embedded set (MNIST's 10,000 test images, MD5-
            checked on first load): ``"test"`` = the first 1,000 (the papers' evaluation set),
            ``"train"`` = the last 9,000. With a folder, ``"mnist"`` reads the IDX files
            (``train-images-idx3-ubyte`` ... ``t10k-labels-idx1-ubyte``, ``.gz`` or not).
        size: RESISC-45 only: images are resized to ``size x size`` (default 64).

    Returns:
        a Dataset of ``(image float32 [C, H, W] in [0, 1], label int64)`` with the metadata
        above (MNIST mean/std (0.1307,)/(0.3081,); CIFAR-10 the training-pixel statistics;
        RESISC-45 the ImageNet statistics).
    """
    if name not in NAMES:
        raise ValueError(f"name must be one of {', '.join(NAMES)}; got {name!r}")
    check_split(split)
    if size is not None and name != "resisc45":
        raise ValueError(f"size applies to resisc45 only (MNIST and CIFAR-10 keep their native size); got size={size}")
    if data_dir is None:
        if name == "mnist":
            return load_embedded_mnist(split)
        expect = {"cifar10": cifar.EXPECT, "cifar100": cifar.EXPECT_100}.get(name, resisc.EXPECT)
        raise FileNotFoundError(f"{name} is not embedded in pyens and is never downloaded: pass data_dir; {expect}")
    data_dir = Path(data_dir).expanduser()
    if name == "mnist":
        return load_mnist(split, data_dir)
    if name == "cifar10":
        return load_cifar10(split, data_dir)
    if name == "cifar100":
        return load_cifar100(split, data_dir)
    return load_resisc45(split, data_dir, size=DEFAULT_SIZE if size is None else size)


__all__ = [
    "load", "subset", "batches", "NAMES", "SPLITS", "ImageDataset", "TensorImageDataset", "ImageFolderDataset",
    "read_idx", "load_mnist", "load_embedded_mnist", "load_cifar10", "load_cifar100", "load_resisc45",
    "load_npz", "load_image_folder",
]
