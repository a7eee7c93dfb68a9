"""Labelled image datasets behind one interface: ``load_dataset(name, split)``.

=======================  ============================================================  ================
name                     where the images come from                                    needs internet?
=======================  ============================================================  ================
``fashion-mnist``        idx(.gz) files in ``root`` / ``$DKVB_FASHION_MNIST`` /        only the fallback
                         ``/usr/share/datasets/fashion-mnist`` (Debian package          with
                         ``dataset-fashion-mnist``); else torchvision's FashionMNIST    ``download=True``
``cifar10``/``cifar100`` ``<root>/<name>/{train,test}/<class>/*`` (root: ``$DKVB_DATA``   only the fallback
                         or ``~/.cache/dkvb/data``), unpacked once from                 with
                         ``../shared/data/<name>.tar.gz`` (``$DKVB_SHARED_DATA``) when   ``download=True``
                         present; else torchvision's CIFAR10/CIFAR100 in ``root``
``imagefolder:<path>``   ``<path>/{train,test or val}/<class>/*``                        no
``sklearn-digits``       scikit-learn's bundled 8x8 digits, upscaled to 32x32            no
``synthetic``            seeded random coloured images, 4 classes                        no
=======================  ============================================================  ================
"""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .io import sha256_file

__all__ = ["ImageDataset", "load_dataset", "list_datasets", "ensure_cifar", "read_idx", "default_data_root"]

log = logging.getLogger(__name__)

Split = Literal["train", "test"]
SPLITS = ("train", "test")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Official fine-label order of CIFAR-100 (batches.meta); it happens to be alphabetical.
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
_CIFAR_CLASSES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------- the dataset


class _ArrayImages:
    """uint8 images (N, H, W) or (N, H, W, 3) held in memory."""

    def __init__(self, array: np.ndarray) -> None:
        if array.dtype != np.uint8 or array.ndim not in (3, 4):
            raise ValueError(f"expected uint8 (N, H, W[, 3]) images, got {array.dtype} {array.shape}")
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> Image.Image:
        return Image.fromarray(self.array[i], mode="L" if self.array.ndim == 3 else "RGB")


class _FileImages:
    """Images read from files on demand."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Image.Image:
        """The image; ``ValueError`` naming the file for a corrupt, truncated, empty or oversized one."""
        try:
            with Image.open(self.paths[i]) as img:
                img.load()
                return img
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"{self.paths[i]}: unreadable image ({type(e).__name__}: {e})") from None


class _TorchvisionImages:
    """A torchvision dataset whose items are (PIL image, label)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Image.Image:
        return self.dataset[i][0]


class ImageDataset(Dataset):
    """Labelled images: ``ds[i] -> (transform(PIL image), int label)``.

    Attributes:
        name: registry name it was loaded by.
        split: ``"train"`` or ``"test"``.
        class_names: names of all classes; labels index into it.
        targets: (N,) int64 numpy array of labels, readable without decoding images.
        root: folder the images were read from (None for in-memory sets); part of cache keys.
        transform: applied to each PIL image; settable (e.g. ``encoder.preprocess``).
    """

    def __init__(
        self,
        images: Any,
        targets: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        *,
        name: str,
        split: str,
        root: str | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        targets = np.asarray(targets, dtype=np.int64)
        if targets.ndim != 1 or len(targets) != len(images):
            raise ValueError(f"{name}/{split}: {len(images)} images but labels of shape {targets.shape}")
        if len(targets) and (targets.min() < 0 or targets.max() >= len(class_names)):
            raise ValueError(f"{name}/{split}: labels outside [0, {len(class_names)})")
        self.images = images
        self.targets = targets
        self.class_names = list(class_names)
        self.name = name
        self.split = split
        self.root = root
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[int(index)]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, classes={len(self.class_names)})"


# --------------------------------------------------------------------------- idx files (MNIST format)

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


def _load_fashion_mnist(arg: str | None, split: str, root: str | None, download: bool) -> ImageDataset:
    prefix = "train" if split == "train" else "t10k"
    candidates = [root, os.environ.get("DKVB_FASHION_MNIST"), DEBIAN_FASHION_MNIST]
    for folder in (Path(c).expanduser() for c in candidates if c):
        images = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            x, y = read_idx(images), read_idx(labels)
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or x.dtype != np.uint8:
                raise ValueError(f"Fashion-MNIST files in {folder} disagree: images {x.shape} {x.dtype}, labels {y.shape}")
            return ImageDataset(_ArrayImages(x), y, FASHION_MNIST_CLASSES, name="fashion-mnist", split=split, root=str(folder.resolve()))
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
        _ArrayImages(ds.data.numpy()), ds.targets.numpy(), FASHION_MNIST_CLASSES, name="fashion-mnist", split=split, root=str(tv_root)
    )


# --------------------------------------------------------------------------- image folders


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _scan_folder(folder: Path, class_names: Sequence[str]) -> tuple[list[str], list[int]]:
    """Sorted image files of ``folder/<class>/`` with their class indices."""
    index = {c: i for i, c in enumerate(class_names)}
    paths: list[str] = []
    labels: list[int] = []
    for cls in _class_dirs(folder):
        if cls not in index:
            raise ValueError(f"{folder}: class folder {cls!r} is not one of the dataset's classes")
        files = sorted(e.path for e in os.scandir(folder / cls) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        paths += files
        labels += [index[cls]] * len(files)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<class>/")
    return paths, labels


def _split_dir(base: Path, split: str) -> Path:
    folder = base / split
    if not folder.is_dir() and split == "test" and (base / "val").is_dir():
        folder = base / "val"
    if not folder.is_dir():
        hint = " (or 'val')" if split == "test" else ""
        raise FileNotFoundError(f"image folder split not found: {folder}{hint}; expected <path>/<split>/<class>/<image>")
    return folder


def _load_imagefolder(arg: str | None, split: str, root: str | None, download: bool) -> ImageDataset:
    if not arg:
        raise ValueError("use 'imagefolder:<path>' with <path>/{train,test}/<class>/<image>")
    base = Path(arg).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"image folder not found: {base}")
    folder = _split_dir(base, split)
    # One label order for every split: the union of the class folders of all splits, so a class
    # present in only one split cannot shift the labels of the other.
    classes = set(_class_dirs(folder))
    for other in ("train", "test", "val"):
        if (base / other).is_dir():
            classes |= set(_class_dirs(base / other))
    class_names = sorted(classes)
    paths, labels = _scan_folder(folder, class_names)
    return ImageDataset(_FileImages(paths), labels, class_names, name=f"imagefolder:{arg}", split=split, root=str(base.resolve()))


# --------------------------------------------------------------------------- CIFAR


def default_data_root() -> Path:
    """``$DKVB_DATA`` or ``~/.cache/dkvb/data``: where datasets are unpacked or downloaded."""
    return Path(os.environ.get("DKVB_DATA", "~/.cache/dkvb/data")).expanduser()


def shared_data_dir() -> Path:
    """``$DKVB_SHARED_DATA`` or ``<repo>/../shared/data``: the offline CIFAR archives."""
    env = os.environ.get("DKVB_SHARED_DATA")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _expected_sha256(archive: Path) -> str:
    sums = archive.parent / "SHA256SUMS"
    if not sums.is_file():
        raise FileNotFoundError(f"checksum file missing: {sums}")
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == archive.name:
            return parts[0].lower()
    raise ValueError(f"{sums} has no checksum for {archive.name}")


def ensure_cifar(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Unpack ``<shared data>/<name>.tar.gz`` into ``cache_dir/<name>`` once; return that folder.

    The archive's SHA256 is checked against ``SHA256SUMS``; extraction goes to a temporary
    folder that is renamed into place, so an interrupted run never leaves a partial copy.
    Raises ``FileNotFoundError`` when the archive is absent.
    """
    if name not in _CIFAR_CLASSES:
        raise ValueError(f"unknown CIFAR set {name!r}; known: {sorted(_CIFAR_CLASSES)}")
    cache = Path(cache_dir).expanduser() if cache_dir else default_data_root()
    target = cache / name
    if (target / "train").is_dir() and (target / "test").is_dir():
        return target
    archive = shared_data_dir() / f"{name}.tar.gz"
    if not archive.is_file():
        raise FileNotFoundError(
            f"offline archive not found: {archive} (set DKVB_SHARED_DATA to its folder, "
            f"or unpack {name} yourself into {target}/{{train,test}}/<class>/)"
        )
    expected = _expected_sha256(archive)
    actual = sha256_file(archive)
    if actual != expected:
        raise ValueError(f"checksum mismatch for {archive}: {actual} != {expected} (from SHA256SUMS)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        log.info("unpacking %s into %s", archive, target)
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        unpacked = tmp / name
        if not ((unpacked / "train").is_dir() and (unpacked / "test").is_dir()):
            raise ValueError(f"{archive} does not contain {name}/train and {name}/test")
        try:
            os.rename(unpacked, target)
        except OSError:
            if not (target / "train").is_dir():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_cifar(name: str, arg: str | None, split: str, root: str | None, download: bool) -> ImageDataset:
    data_root = Path(root).expanduser() if root else default_data_root()
    official = _CIFAR_CLASSES[name]
    folder = data_root / name / split
    if not folder.is_dir() and (shared_data_dir() / f"{name}.tar.gz").is_file():
        ensure_cifar(name, data_root)
    if folder.is_dir():
        found = _class_dirs(folder)
        if found != sorted(official):
            raise ValueError(f"{folder}: class folders {found[:5]}... differ from the official {name} classes")
        paths, labels = _scan_folder(folder, official)
        return ImageDataset(_FileImages(paths), labels, official, name=name, split=split, root=str(data_root.resolve()))
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(str(data_root), train=split == "train", download=download)
    except RuntimeError as exc:
        raise FileNotFoundError(
            f"{name} not found: neither {folder}/<class>/ nor torchvision's copy in {data_root}. "
            f"Unpack the offline archive (dkvb.datasets.ensure_cifar), or pass download=True (needs internet)."
        ) from exc
    if tuple(ds.classes) != official:
        raise ValueError(f"torchvision {name} classes {ds.classes[:5]}... differ from the official order")
    return ImageDataset(_ArrayImages(ds.data), ds.targets, official, name=name, split=split, root=str(data_root.resolve()))


# --------------------------------------------------------------------------- small in-memory sets


def _load_digits(arg: str | None, split: str, root: str | None, download: bool) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(digits.target)), test_size=0.2, random_state=0, stratify=digits.target
    )
    idx = np.sort(idx_train if split == "train" else idx_test)
    small = np.clip(digits.images[idx] * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in small])
    return ImageDataset(_ArrayImages(big), digits.target[idx], [str(d) for d in range(10)], name="sklearn-digits", split=split)


def _load_synthetic(arg: str | None, split: str, root: str | None, download: bool) -> ImageDataset:
    """4 classes of 32x32 RGB noise around a class colour: 64 per class (train) / 16 (test)."""
    num_classes, per_class, size = 4, (64 if split == "train" else 16), 32
    rng = np.random.default_rng(0 if split == "train" else 1)
    colours = np.random.default_rng(1234).uniform(40, 215, size=(num_classes, 3))
    labels = np.repeat(np.arange(num_classes), per_class)
    noise = rng.normal(0, 30, size=(len(labels), size, size, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return ImageDataset(_ArrayImages(images), labels, [f"class{i}" for i in range(num_classes)], name="synthetic", split=split)


# --------------------------------------------------------------------------- registry

_Loader = Callable[[str | None, str, str | None, bool], ImageDataset]
_LOADERS: dict[str, _Loader] = {
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": lambda arg, split, root, download: _load_cifar("cifar10", arg, split, root, download),
    "cifar100": lambda arg, split, root, download: _load_cifar("cifar100", arg, split, root, download),
    "imagefolder": _load_imagefolder,
    "sklearn-digits": _load_digits,
    "synthetic": _load_synthetic,
}


def list_datasets() -> list[str]:
    """Registry names (``imagefolder`` is used as ``imagefolder:<path>``)."""
    return list(_LOADERS)


def load_dataset(
    name: str,
    split: Split,
    *,
    root: str | None = None,
    transform: Callable[[Image.Image], Any] | None = None,
    download: bool = False,
) -> ImageDataset:
    """Load one split of a registered dataset.

    Args:
        name: a :func:`list_datasets` name, or ``imagefolder:<path>``.
        split: ``"train"`` or ``"test"``.
        root: where to look instead of the default location of that dataset.
        transform: applied to each PIL image (e.g. ``encoder.preprocess``).
        download: allow torchvision's internet download when no local copy exists.

    Raises:
        ValueError: unknown name or split, or inconsistent files.
        FileNotFoundError: the data is not on this machine (the message says where it looked).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    prefix, _, arg = name.partition(":")
    loader = _LOADERS.get(prefix)
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; known: {list_datasets()} (imagefolder as 'imagefolder:<path>')")
    if arg and prefix != "imagefolder":
        raise ValueError(f"dataset {prefix!r} takes no ':<argument>', got {name!r}")
    dataset = loader(arg or None, split, root, download)
    dataset.transform = transform
    return dataset

