"""Fashion-MNIST from idx(.gz) files (the Debian package ``dataset-fashion-mnist``, ``$DKVB_FASHION_MNIST``
or a given folder), else torchvision's copy."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .base import ArrayImages, ImageDataset, default_data_root

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (plain or ``.gz``) into a numpy array; ``ValueError`` naming the file if corrupt."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"corrupt idx file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"corrupt idx file {path}: bad magic number {raw[:4].hex() or '(empty)'}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"corrupt idx file {path}: truncated header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"corrupt idx file {path}: {len(raw)} bytes but header {dims} implies {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(arg: str | None, split: str, root: str | None, download: bool) -> ImageDataset:
    prefix = "train" if split == "train" else "t10k"
    candidates = [root, os.environ.get("DKVB_FASHION_MNIST"), DEBIAN_FASHION_MNIST]
    for folder in (Path(c).expanduser() for c in candidates if c):
        images = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            x, y = read_idx(images), read_idx(labels)
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or x.dtype != np.uint8:
                raise ValueError(f"Fashion-MNIST files in {folder} disagree: images {x.shape} {x.dtype}, labels {y.shape}")
            return ImageDataset(ArrayImages(x), y, FASHION_MNIST_CLASSES, name="fashion-mnist", split=split, root=str(folder.resolve()))
    import torchvision

    tv_root = Path(root or default_data_root()).expanduser()
    try:
        ds = torchvision.datasets.FashionMNIST(str(tv_root), train=split == "train", download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found. You can use download=True"
        looked = [str(c) for c in candidates if c]
        raise FileNotFoundError(
            f"Fashion-MNIST not found: no idx files in {looked} nor a torchvision copy in {tv_root}. "
            "Install the Debian package dataset-fashion-mnist, set DKVB_FASHION_MNIST, "
            "or pass download=True (needs internet)."
        ) from exc
    return ImageDataset(
        ArrayImages(ds.data.numpy()), ds.targets.numpy(), FASHION_MNIST_CLASSES, name="fashion-mnist", split=split, root=str(tv_root)
    )
