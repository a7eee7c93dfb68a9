"""Image folders: ``<path>/{train,test or val}/<class>/<image>``; the scan is shared with CIFAR's
unpacked folders."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .base import FileImages, ImageDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def scan_folder(folder: Path, class_names: Sequence[str]) -> tuple[list[str], list[int]]:
    """Sorted image files of ``folder/<class>/`` with their class indices."""
    index = {c: i for i, c in enumerate(class_names)}
    paths: list[str] = []
    labels: list[int] = []
    for cls in class_dirs(folder):
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


def load_imagefolder(arg: str | None, split: str, root: str | None, download: bool) -> ImageDataset:
    if not arg:
        raise ValueError("use 'imagefolder:<path>' with <path>/{train,test}/<class>/<image>")
    base = Path(arg).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"image folder not found: {base}")
    folder = _split_dir(base, split)
    # One label order for every split: the union of the class folders of all splits, so a class
    # present in only one split cannot shift the labels of the other.
    classes = set(class_dirs(folder))
    for other in ("train", "test", "val"):
        if (base / other).is_dir():
            classes |= set(class_dirs(base / other))
    class_names = sorted(classes)
    paths, labels = scan_folder(folder, class_names)
    return ImageDataset(FileImages(paths), labels, class_names, name=f"imagefolder:{arg}", split=split, root=str(base.resolve()))
