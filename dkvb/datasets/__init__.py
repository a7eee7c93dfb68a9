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

The package: :mod:`.base` (the :class:`ImageDataset` interface and image sources), one module per
source (:mod:`.fashion_mnist`, :mod:`.cifar`, :mod:`.folder`, :mod:`.small`) and this registry.
"""
from __future__ import annotations

from typing import Any, Callable

from PIL import Image

from .base import SPLITS, ImageDataset, Split, default_data_root
from .cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, ensure_cifar, load_cifar, shared_data_dir
from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, read_idx
from .folder import IMAGE_EXTENSIONS, load_imagefolder
from .small import load_digits, load_synthetic

__all__ = ["ImageDataset", "load_dataset", "list_datasets", "ensure_cifar", "read_idx", "default_data_root",
           "shared_data_dir", "FASHION_MNIST_CLASSES", "CIFAR10_CLASSES", "CIFAR100_CLASSES", "IMAGE_EXTENSIONS",
           "SPLITS"]

_Loader = Callable[[str | None, str, str | None, bool], ImageDataset]
_LOADERS: dict[str, _Loader] = {
    "fashion-mnist": load_fashion_mnist,
    "cifar10": lambda arg, split, root, download: load_cifar("cifar10", arg, split, root, download),
    "cifar100": lambda arg, split, root, download: load_cifar("cifar100", arg, split, root, download),
    "imagefolder": load_imagefolder,
    "sklearn-digits": load_digits,
    "synthetic": load_synthetic,
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
