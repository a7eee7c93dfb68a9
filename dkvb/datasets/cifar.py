"""CIFAR-10/100: unpacked once from the offline archives (checksummed) into the data root, else
torchvision's copy."""
from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from ..io import sha256_file
from .base import ArrayImages, FileImages, ImageDataset, default_data_root
from .folder import class_dirs, scan_folder

log = logging.getLogger(__name__)

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
CIFAR_CLASSES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}


def shared_data_dir() -> Path:
    """``$DKVB_SHARED_DATA`` or ``<repo>/../shared/data``: the offline CIFAR archives."""
    env = os.environ.get("DKVB_SHARED_DATA")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


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
    if name not in CIFAR_CLASSES:
        raise ValueError(f"unknown CIFAR set {name!r}; known: {sorted(CIFAR_CLASSES)}")
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


def load_cifar(name: str, arg: str | None, split: str, root: str | None, download: bool) -> ImageDataset:
    data_root = Path(root).expanduser() if root else default_data_root()
    official = CIFAR_CLASSES[name]
    folder = data_root / name / split
    if not folder.is_dir() and (shared_data_dir() / f"{name}.tar.gz").is_file():
        ensure_cifar(name, data_root)
    if folder.is_dir():
        found = class_dirs(folder)
        if found != sorted(official):
            raise ValueError(f"{folder}: class folders {found[:5]}... differ from the official {name} classes")
        paths, labels = scan_folder(folder, official)
        return ImageDataset(FileImages(paths), labels, official, name=name, split=split, root=str(data_root.resolve()))
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
    return ImageDataset(ArrayImages(ds.data), ds.targets, official, name=name, split=split, root=str(data_root.resolve()))
