"""The one labelled-image interface every dataset has (:class:`ImageDataset`), and where its images
live (in memory, in files read on demand) and the default data root."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

Split = Literal["train", "test"]
SPLITS = ("train", "test")


def default_data_root() -> Path:
    """``$DKVB_DATA`` or ``~/.cache/dkvb/data``: where datasets are unpacked or downloaded."""
    return Path(os.environ.get("DKVB_DATA", "~/.cache/dkvb/data")).expanduser()


class ArrayImages:
    """uint8 images (N, H, W) or (N, H, W, 3) held in memory."""

    def __init__(self, array: np.ndarray) -> None:
        if array.dtype != np.uint8 or array.ndim not in (3, 4):
            raise ValueError(f"expected uint8 (N, H, W[, 3]) images, got {array.dtype} {array.shape}")
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> Image.Image:
        return Image.fromarray(self.array[i], mode="L" if self.array.ndim == 3 else "RGB")


class FileImages:
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
