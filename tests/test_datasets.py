"""Dataset registry: real Fashion-MNIST / CIFAR-10 when on this machine, and folders, archives and
idx files the tests write themselves."""
from __future__ import annotations

import collections
import gzip
import hashlib
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dkvb import datasets
from dkvb.datasets import cifar, fashion_mnist
from dkvb.io import sha256_file
from dkvb.datasets import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    ensure_cifar,
    list_datasets,
    load_dataset,
    read_idx,
)

SHARED = datasets.shared_data_dir()
CIFAR10_ARCHIVE = SHARED / "cifar10.tar.gz"
FASHION_MNIST = Path(fashion_mnist.DEBIAN_FASHION_MNIST)


def _png(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


# ------------------------------------------------------------------ Fashion-MNIST


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason=f"Fashion-MNIST not installed at {FASHION_MNIST} "
                    "(Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist_counts_and_classes():
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.class_names == list(FASHION_MNIST_CLASSES) == test.class_names
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10
    image, label = train[0]
    assert image.size == (28, 28) and image.mode == "L" and label == int(train.targets[0])


def _write_idx(path: Path, array: np.ndarray) -> None:
    code = {np.uint8: 0x08}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_fashion_mnist_from_idx_files_in_root(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    train = load_dataset("fashion-mnist", "train", root=str(tmp_path))
    test = load_dataset("fashion-mnist", "test", root=str(tmp_path))
    assert (len(train), len(test)) == (12, 5)
    assert train.targets.tolist() == [i % 10 for i in range(12)]
    assert train.root == str(tmp_path.resolve())


def test_corrupt_idx_file_names_the_file(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    _write_idx(bad, np.zeros((3, 4, 4), np.uint8))
    bad.write_bytes(bad.read_bytes()[:-5])  # truncated
    with pytest.raises(ValueError, match=f"corrupt idx file {bad}"):
        read_idx(bad)
    bad.write_bytes(b"\x01\x02garbage")
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(bad)


def test_fashion_mnist_missing_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian-copy"))
    monkeypatch.delenv("DKVB_FASHION_MNIST", raising=False)
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST not found") as info:
        load_dataset("fashion-mnist", "train", root=str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(info.value)


# ------------------------------------------------------------------ image folders (LACUNA-100 / ImageNet layout)


def _write_folder(base: Path, test_name: str = "val") -> None:
    for split, per_class in (("train", 3), (test_name, 2)):
        for c, cls in enumerate(("cat", "dog", "fish")):
            for i in range(per_class):
                _png(base / split / cls / f"{i:03d}.png", 40 * c + i)


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_imagefolder_labels_and_class_names(tmp_path, test_name):
    _write_folder(tmp_path, test_name)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")  # ignored
    train = load_dataset(f"imagefolder:{tmp_path}", "train")
    test = load_dataset(f"imagefolder:{tmp_path}", "test", transform=lambda im: np.asarray(im))
    assert train.class_names == ["cat", "dog", "fish"] == test.class_names
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert test.targets.tolist() == [0, 0, 1, 1, 2, 2]
    pixels, label = test[3]  # dog/001.png
    assert label == 1 and pixels.shape == (8, 8, 3) and int(pixels[0, 0, 0]) == 41
    assert train.root == str(tmp_path.resolve())


def test_imagefolder_class_in_one_split_only_keeps_labels_aligned(tmp_path):
    _write_folder(tmp_path, "test")
    _png(tmp_path / "test" / "bird" / "000.png", 7)  # sorts first; absent from train
    train = load_dataset(f"imagefolder:{tmp_path}", "train")
    test = load_dataset(f"imagefolder:{tmp_path}", "test")
    assert train.class_names == test.class_names == ["bird", "cat", "dog", "fish"]
    assert train.targets.tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_imagefolder_missing_paths_are_named(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_dataset(f"imagefolder:{missing}", "train")
    (tmp_path / "only-train" / "train" / "a").mkdir(parents=True)
    _png(tmp_path / "only-train" / "train" / "a" / "0.png", 1)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "only-train" / "test")):
        load_dataset(f"imagefolder:{tmp_path / 'only-train'}", "test")
    (tmp_path / "no-images" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        load_dataset(f"imagefolder:{tmp_path / 'no-images'}", "train")


# ------------------------------------------------------------------ CIFAR from an offline archive


def _fake_cifar_archive(shared: Path, *, per_class: int = 2, sums: str | None = None) -> Path:
    """``shared/cifar10.tar.gz`` in the layout of ../shared/data (cifar10/{train,test}/<class>/NNNN.png)."""
    src = shared / "src"
    for split, n in (("train", per_class), ("test", 1)):
        for c, cls in enumerate(CIFAR10_CLASSES):
            for i in range(n):
                _png(src / "cifar10" / split / cls / f"{i:04d}.png", 20 * c + i, size=32)
    archive = shared / "cifar10.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar10", arcname="cifar10")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    (shared / "SHA256SUMS").write_text(f"{sums or digest}  cifar10.tar.gz\n0000  cifar100.tar.gz\n")
    return archive


def test_cifar10_unpacked_from_a_fake_archive(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    archive = _fake_cifar_archive(shared)
    monkeypatch.setenv("DKVB_SHARED_DATA", str(shared))
    root = tmp_path / "data"
    train = load_dataset("cifar10", "train", root=str(root))  # unpacks on first use
    test = load_dataset("cifar10", "test", root=str(root))
    assert (len(train), len(test)) == (20, 10)
    assert train.class_names == list(CIFAR10_CLASSES)
    assert np.bincount(train.targets).tolist() == [2] * 10
    image, label = test[3]
    assert label == 3 and image.size == (32, 32) and image.getpixel((0, 0)) == (60, 60, 60)
    assert sorted(p.name for p in root.iterdir()) == ["cifar10"]  # no temporary folder left
    archive.unlink()  # already unpacked: the archive is not needed again
    assert ensure_cifar("cifar10", root) == root / "cifar10"
    assert len(load_dataset("cifar10", "train", root=str(root))) == 20


def test_cifar_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    _fake_cifar_archive(shared, sums="0" * 64)
    monkeypatch.setenv("DKVB_SHARED_DATA", str(shared))
    with pytest.raises(ValueError, match="checksum mismatch"):
        ensure_cifar("cifar10", tmp_path / "data")
    assert not (tmp_path / "data" / "cifar10").exists()
    (shared / "SHA256SUMS").unlink()
    with pytest.raises(FileNotFoundError, match="SHA256SUMS"):
        ensure_cifar("cifar10", tmp_path / "data")


def test_cifar_missing_everywhere_names_the_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("DKVB_SHARED_DATA", str(tmp_path / "no-shared"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no-shared" / "cifar10.tar.gz")):
        ensure_cifar("cifar10", tmp_path / "data")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "data" / "cifar10" / "train")):
        load_dataset("cifar10", "train", root=str(tmp_path / "data"))
    with pytest.raises(ValueError, match="unknown CIFAR set"):
        ensure_cifar("cifar11", tmp_path / "data")


@pytest.mark.cifar
@pytest.mark.skipif(not CIFAR10_ARCHIVE.is_file(), reason=f"offline CIFAR-10 archive not at {CIFAR10_ARCHIVE}")
def test_real_cifar10_archive_counts():
    """Checksum and per-split, per-class counts from the archive listing (nothing decoded or unpacked)."""
    assert sha256_file(CIFAR10_ARCHIVE) == cifar._expected_sha256(CIFAR10_ARCHIVE)
    counts: collections.Counter = collections.Counter()
    with tarfile.open(CIFAR10_ARCHIVE, "r:gz") as tar:
        for member in tar:
            if member.isfile():
                _, split, cls, _ = member.name.split("/")
                counts[split, cls] += 1
    assert sum(n for (s, _), n in counts.items() if s == "train") == 50000
    assert sum(n for (s, _), n in counts.items() if s == "test") == 10000
    assert sorted({c for _, c in counts}) == sorted(CIFAR10_CLASSES)
    assert set(counts.values()) == {5000, 1000}


@pytest.mark.cifar
@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10_ARCHIVE.is_file(), reason=f"offline CIFAR-10 archive not at {CIFAR10_ARCHIVE}")
@pytest.mark.skipif(not os.environ.get("DKVB_SLOW_TESTS"), reason="unpacks 60,000 files (20-60 s on 2 cores): "
                    "set DKVB_SLOW_TESTS=1 to run")
def test_real_cifar10_unpacks_and_loads(tmp_path):
    """Unpacks the real archive into tmp, checks the counts, decodes two images only."""
    train = load_dataset("cifar10", "train", root=str(tmp_path))
    test = load_dataset("cifar10", "test", root=str(tmp_path))
    assert (len(train), len(test)) == (50000, 10000)
    assert np.bincount(train.targets).tolist() == [5000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10
    for ds in (train, test):
        image, _ = ds[len(ds) - 1]
        assert image.size == (32, 32) and image.mode == "RGB"


# ------------------------------------------------------------------ built-in sets and the registry


def test_sklearn_digits():
    train = load_dataset("sklearn-digits", "train")
    test = load_dataset("sklearn-digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.class_names == [str(d) for d in range(10)]
    assert set(np.unique(test.targets)) == set(range(10))
    image, _ = train[0]
    assert image.size == (32, 32)
    assert np.array_equal(load_dataset("sklearn-digits", "train").targets, train.targets)  # deterministic split


def test_synthetic_is_seeded_and_balanced():
    a, b = load_dataset("synthetic", "train"), load_dataset("synthetic", "train")
    assert len(a) == 256 and len(load_dataset("synthetic", "test")) == 64
    assert np.bincount(a.targets).tolist() == [64] * 4
    assert np.array_equal(np.asarray(a[5][0]), np.asarray(b[5][0]))


def test_registry_errors():
    known = {"fashion-mnist", "cifar10", "cifar100", "imagefolder", "sklearn-digits", "synthetic"}
    assert known <= set(list_datasets())
    with pytest.raises(ValueError, match="unknown dataset 'mnist-xl'"):
        load_dataset("mnist-xl", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("synthetic", "validation")
    with pytest.raises(ValueError, match="takes no ':<argument>'"):
        load_dataset("synthetic:foo", "train")
    with pytest.raises(ValueError, match="imagefolder:<path>"):
        load_dataset("imagefolder", "train")


def test_transform_is_applied_to_items():
    ds = load_dataset("synthetic", "test", transform=lambda im: im.size)
    assert ds[0] == ((32, 32), 0)
