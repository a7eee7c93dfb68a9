"""Small in-memory sets that need no files: scikit-learn's digits and seeded synthetic images."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .base import ArrayImages, ImageDataset


def load_digits(arg: str | None, split: str, root: str | None, download: bool) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(digits.target)), test_size=0.2, random_state=0, stratify=digits.target
    )
    idx = np.sort(idx_train if split == "train" else idx_test)
    small = np.clip(digits.images[idx] * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in small])
    return ImageDataset(ArrayImages(big), digits.target[idx], [str(d) for d in range(10)], name="sklearn-digits", split=split)


def load_synthetic(arg: str | None, split: str, root: str | None, download: bool) -> ImageDataset:
    """4 classes of 32x32 RGB noise around a class colour: 64 per class (train) / 16 (test)."""
    num_classes, per_class, size = 4, (64 if split == "train" else 16), 32
    rng = np.random.default_rng(0 if split == "train" else 1)
    colours = np.random.default_rng(1234).uniform(40, 215, size=(num_classes, 3))
    labels = np.repeat(np.arange(num_classes), per_class)
    noise = rng.normal(0, 30, size=(len(labels), size, size, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return ImageDataset(ArrayImages(images), labels, [f"class{i}" for i in range(num_classes)], name="synthetic", split=split)
