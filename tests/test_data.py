"""pyens.data: the embedded MNIST split and its MD5 check, and each reader on tiny synthetic files."""
import gzip
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyens import data
from pyens.data.mnist_idx import EMBEDDED_DIR, load_embedded_mnist, read_idx


# --------------------------------------------------------------------------- embedded MNIST
@pytest.fixture(scope="module")
def embedded():
    return {split: data.load("mnist", split) for split in ("train", "test")}


def test_embedded_split_sizes_range_and_metadata(embedded):
    train, test = embedded["train"], embedded["test"]
    assert (len(train), len(test)) == (9000, 1000)
    for ds in (train, test):
        assert ds.images.dtype == torch.float32 and ds.images.shape[1:] == (1, 28, 28)
        assert ds.labels.dtype == torch.int64
        assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0 and ds.images.max() == 1.0
        assert set(ds.labels.unique().tolist()) == set(range(10))
        assert (ds.name, ds.num_classes, ds.image_shape) == ("mnist", 10, (1, 28, 28))
        assert (ds.mean, ds.std, ds.classes) == ((0.1307,), (0.3081,), tuple("0123456789"))
    image, label = test[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and label.item() == 7  # MNIST's first test digit


def test_embedded_test_is_first_1000_and_train_the_last_9000(embedded):
    raw = read_idx(EMBEDDED_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(EMBEDDED_DIR / "t10k-labels-idx1-ubyte.gz")
    assert raw.shape == (10000, 28, 28)
    pixels = torch.from_numpy(raw.astype(np.float32) / 255).unsqueeze(1)
    assert torch.equal(embedded["test"].images, pixels[:1000])
    assert torch.equal(embedded["train"].images, pixels[1000:])
    assert torch.equal(embedded["train"].labels, torch.from_numpy(labels[1000:].astype(np.int64)))


def test_md5_check_fires_on_a_corrupted_copy(tmp_path):
    for f in EMBEDDED_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    assert len(load_embedded_mnist("test", root=tmp_path)) == 1000  # an intact copy passes
    target = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[-20] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz is corrupted"):
        load_embedded_mnist("test", root=tmp_path)
    (tmp_path / "MD5SUMS").unlink()
    with pytest.raises(FileNotFoundError, match="MD5"):
        load_embedded_mnist("test", root=tmp_path)


# --------------------------------------------------------------------------- IDX (full MNIST)
def write_idx(path: Path, array: np.ndarray, code: int = 0x08):
    payload = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_reader_on_synthetic_mnist(tmp_path, suffix):
    rng = np.random.default_rng(0)
    sets = {}
    for prefix, n in (("train", 7), ("t10k", 3)):
        images = rng.integers(0, 256, (n, 5, 4), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        sets["train" if prefix == "train" else "test"] = images, labels
    for split, (images, labels) in sets.items():
        ds = data.load("mnist", split, data_dir=tmp_path)
        assert ds.images.shape == (len(labels), 1, 5, 4) and ds.image_shape == (1, 5, 4)
        assert torch.equal(ds.images, torch.from_numpy(images).float().div(255).unsqueeze(1))
        assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))


def test_idx_reader_dtypes_and_malformed_files(tmp_path):
    ints = np.arange(-3, 3, dtype=np.int32).reshape(2, 3)
    write_idx(tmp_path / "ints", ints, code=0x0C)
    assert np.array_equal(read_idx(tmp_path / "ints"), ints)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 4), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="15 bytes follow"):
        read_idx(tmp_path / "short")


# --------------------------------------------------------------------------- CIFAR-10
def write_cifar(directory: Path, counts: dict[str, int]) -> dict[str, tuple[np.ndarray, list]]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    written = {}
    for name, n in counts.items():
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(directory / name, "wb") as f:  # protocol 2 and bytes keys, as the real batches
            pickle.dump({b"batch_label": name.encode(), b"data": rows, b"labels": labels}, f, protocol=2)
        written[name] = rows, labels
    return written


CIFAR_COUNTS = {**{f"data_batch_{i}": i for i in range(1, 6)}, "test_batch": 4}


@pytest.mark.parametrize("nested", [False, True])
def test_cifar_reader_on_synthetic_pickles(tmp_path, nested):
    written = write_cifar(tmp_path / "cifar-10-batches-py" if nested else tmp_path, CIFAR_COUNTS)
    train = data.load("cifar10", "train", data_dir=tmp_path)
    test = data.load("cifar10", "test", data_dir=tmp_path)
    assert len(train) == 15 and len(test) == 4
    assert train.images.shape == (15, 3, 32, 32) and train.image_shape == (3, 32, 32)
    rows, labels = written["test_batch"]
    # A row is the red plane, then green, then blue, each 32x32 row-major.
    assert test.images[2, 1, 3, 5] == rows[2, 1024 + 3 * 32 + 5] / 255
    assert test.labels.tolist() == labels
    assert train.labels[:1].tolist() == written["data_batch_1"][1]
    assert train.classes[0] == "airplane" and train.num_classes == 10 and len(train.mean) == 3


def test_cifar_reader_refuses_pickles_that_are_not_arrays(tmp_path):
    import datetime

    write_cifar(tmp_path, CIFAR_COUNTS)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": datetime.date(2020, 1, 1), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load datetime.date"):
        data.load("cifar10", "test", data_dir=tmp_path)


# --------------------------------------------------------------------------- image folder
COLORS = {"forest": (0, 128, 0), "lake": (0, 0, 255), "airport": (200, 200, 200)}


def write_tree(root: Path, per_class: int = 5, classes=COLORS):
    for name, color in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (10, 8), color).save(root / name / f"{i:03d}.png")
    (root / "lake" / "notes.txt").write_text("not an image")


def test_image_folder_reader_splits_80_20_deterministically(tmp_path):
    write_tree(tmp_path)
    train = data.load("resisc45", "train", data_dir=tmp_path, size=6)
    test = data.load("resisc45", "test", data_dir=tmp_path, size=6)
    assert train.classes == ("airport", "forest", "lake") and train.num_classes == 3
    assert (len(train), len(test)) == (12, 3)  # 4 + 1 of each class's 5
    paths = [p for p, _ in train.samples] + [p for p, _ in test.samples]
    assert len(set(paths)) == 15
    assert [p for p, _ in data.load("resisc45", "test", data_dir=tmp_path).samples] == [p for p, _ in test.samples]
    image, label = test[0]
    assert image.shape == (3, 6, 6) and image.dtype == torch.float32 and train.image_shape == (3, 6, 6)
    assert label.dtype == torch.int64
    want = torch.tensor(COLORS[test.classes[label]], dtype=torch.float32) / 255
    assert torch.allclose(image, want.view(3, 1, 1).expand(3, 6, 6), atol=1 / 255)


def test_image_folder_reader_uses_train_and_test_folders(tmp_path):
    write_tree(tmp_path / "train", per_class=3)
    write_tree(tmp_path / "test", per_class=2)
    train = data.load("resisc45", "train", data_dir=tmp_path)
    test = data.load("resisc45", "test", data_dir=tmp_path)
    assert (len(train), len(test)) == (9, 6) and train.image_shape == (3, 64, 64)
    assert all(p.parent.parent.name == "test" for p, _ in test.samples)
    # Round-robin over the classes, so the first n test images (the eval subset) span them all.
    assert [label for _, label in test.samples] == [0, 1, 2, 0, 1, 2]


# --------------------------------------------------------------------------- errors
def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte not found.*--data-dir for mnist"):
        data.load("mnist", "train", data_dir=tmp_path)
    write_cifar(tmp_path, {f"data_batch_{i}": 1 for i in range(1, 5)})
    with pytest.raises(FileNotFoundError, match=r"data_batch_5 not found.*--data-dir for cifar10"):
        data.load("cifar10", "train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="test_batch"):
        data.load("cifar10", "test", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"never downloaded.*data_batch_1"):
        data.load("cifar10", "test")
    with pytest.raises(FileNotFoundError, match=r"nowhere not found.*--data-dir for resisc45"):
        data.load("resisc45", "test", data_dir=tmp_path / "nowhere")
    write_tree(tmp_path / "r" / "train")
    with pytest.raises(FileNotFoundError, match=r"r/test not found"):
        data.load("resisc45", "test", data_dir=tmp_path / "r")


def test_bad_arguments():
    with pytest.raises(ValueError, match="name must be one of mnist, cifar10, cifar100, resisc45"):
        data.load("svhn")
    with pytest.raises(ValueError, match="split"):
        data.load("mnist", "val")
    with pytest.raises(ValueError, match="size applies to resisc45"):
        data.load("mnist", size=32)


def test_every_public_loader_checks_split_and_size(tmp_path):
    for call in (lambda: data.load_embedded_mnist("val"), lambda: data.load_mnist("val", tmp_path),
                 lambda: data.load_cifar10("val", tmp_path), lambda: data.load_resisc45("val", tmp_path)):
        with pytest.raises(ValueError, match="split must be 'train' or 'test'; got 'val'"):
            call()
    write_tree(tmp_path / "r")
    for size in (0, 2.5, True):
        with pytest.raises(ValueError, match="size must be a positive int"):
            data.load_resisc45("train", tmp_path / "r", size=size)


def test_resisc_splits_list_the_classes_round_robin(tmp_path):
    write_tree(tmp_path, per_class=10)
    for split, per_class in (("train", 8), ("test", 2)):
        labels = [label for _, label in data.load("resisc45", split, data_dir=tmp_path, size=4).samples]
        assert labels == [0, 1, 2] * per_class


# --------------------------------------------------------------------------- batches / subset
def test_batches_visit_every_example_once():
    n = 103
    ids = torch.arange(n)
    ds = data.TensorImageDataset(ids.float().div(n).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(), ids,
                                 name="toy", split="train", classes=[str(i) for i in range(n)], mean=(0.5,), std=(1.0,))
    for shuffle in (False, True):
        got = list(data.batches(ds, 10, shuffle=shuffle, generator=torch.Generator().manual_seed(0)))
        labels = torch.cat([y for _, y in got])
        assert [len(y) for _, y in got] == [10] * 10 + [3]
        assert torch.equal(labels.sort().values, ids) and torch.equal(labels, ids) != shuffle
        assert all(torch.equal(x[:, 0, 0, 0], y.float().div(n)) for x, y in got)  # images travel with labels
    again = torch.cat([y for _, y in data.batches(ds, 10, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(again, labels)  # a seeded generator repeats the epoch
    assert [len(y) for _, y in data.batches(ds, 10, shuffle=True, drop_last=True)] == [10] * 10
    head = data.subset(ds, 7)
    assert torch.equal(head.labels, ids[:7]) and head.images.shape[0] == 7 and head.mean == ds.mean


def test_batches_on_a_lazy_dataset_and_subsets(tmp_path):
    write_tree(tmp_path)
    ds = data.load("resisc45", "train", data_dir=tmp_path, size=4)
    got = [(x.shape, y) for x, y in data.batches(ds, 5, shuffle=True, generator=torch.Generator().manual_seed(0))]
    assert [s[0] for s, _ in got] == [5, 5, 2] and all(s[1:] == (3, 4, 4) for s, _ in got)
    assert sorted(torch.cat([y for _, y in got]).tolist()) == sorted(label for _, label in ds.samples)
    head = data.subset(ds, 3)
    assert head.samples == ds.samples[:3] and head.classes == ds.classes
    with pytest.raises(ValueError, match="n=13 exceeds"):
        data.subset(ds, 13)
    with pytest.raises(ValueError, match="batch_size"):
        next(iter(data.batches(ds, 0, shuffle=False)))
