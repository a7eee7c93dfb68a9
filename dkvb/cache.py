"""Embedding cache: encode a dataset split once, keep it on disk, resume when interrupted.

Layout of one cached split (``<cache_dir>/<encoder>/<dataset>/<split>-<key>/``)::

    chunks/000000.npy …   finished chunks of ``chunk_size`` rows (written atomically)
    embeddings.npy        (N, D) float32/float16, memory-mappable (written once all chunks exist)
    labels.npy            (N,) int64
    meta.json             what the key hashes + shapes + sha256 of both arrays; written last, so its
                          presence = complete

The key hashes the encoder's config (name, resolution, preprocessing, pretrained or random),
the dataset name, split and resolved root, the subset (``limit`` + ``seed``) and the storage
dtype; for datasets read from image files (``imagefolder:``, CIFAR folders) also the file list
with sizes and modification times, so adding, removing, replacing or renaming an image makes a
new entry instead of serving stale embeddings. Loading checks both arrays against the sha256 in
``meta.json``. An interrupted run leaves finished chunks; the next call encodes only the missing ones.
Under ``torch.distributed`` (``torchrun … -m dkvb embed``) rank r encodes chunks r, r+W, …
and rank 0 merges, so the result equals a single-process run row for row.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .threads import worker_init
from tqdm.auto import tqdm

from .data import EmbeddingSet
from .distributed import barrier, rank_and_world
from .io import atomic_write, atomic_write_json, sha256_file

__all__ = ["embed_split", "encode_dataset", "cache_path", "load_cached", "read_meta", "files_digest", "subset_indices"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_DTYPES = {"float32": np.float32, "float16": np.float16}
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def subset_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``limit`` rows (all rows when ``limit`` is None)."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def cache_path(cache_dir: str | os.PathLike, key_fields: dict[str, Any]) -> Path:
    """Folder of one cached split, named readably and suffixed by the hash of ``key_fields``."""
    digest = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    enc, ds = key_fields["encoder"]["name"], key_fields["dataset"]
    return Path(cache_dir).expanduser() / _slug(enc) / _slug(ds) / f"{key_fields['split']}-{digest}"


def files_digest(paths: Sequence[str]) -> str:
    """Digest of image files' names, sizes and modification times (what the cache key holds for
    file datasets: a changed folder gets a new cache entry without hashing every image)."""
    h = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a complete cached split; ``FileNotFoundError``/``ValueError`` naming the folder."""
    meta_file = Path(folder) / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"no complete embedding cache in {folder} (meta.json missing)")
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"corrupt embedding cache in {folder}: meta.json: {e}; delete the folder to re-encode") from e
    if not isinstance(meta, dict):
        raise ValueError(f"corrupt embedding cache in {folder}: meta.json is not an object; delete the folder")
    return meta


def load_cached(folder: str | os.PathLike, class_names: Sequence[str] | None = None) -> EmbeddingSet:
    """Read a complete cached split (memory-mapped, then converted to float32), verifying the
    arrays' sha256 recorded in ``meta.json``."""
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        for name, digest in (meta.get("sha256") or {}).items():
            if name in ("embeddings.npy", "labels.npy") and sha256_file(folder / name) != digest:
                raise ValueError(f"{name} does not match its sha256 in meta.json")
        x = np.load(folder / "embeddings.npy", mmap_mode="r")
        y = np.load(folder / "labels.npy")
        shape = tuple(meta["shape"])
    except (ValueError, OSError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"corrupt embedding cache in {folder}: {type(e).__name__}: {e}; "
                         "delete the folder to re-encode") from e
    if x.ndim != 2 or x.shape != shape or y.shape != (shape[0],):
        raise ValueError(f"corrupt embedding cache in {folder}: arrays {x.shape}/{y.shape} do not match "
                         f"meta.json shape {meta['shape']}; delete the folder to re-encode")
    names = tuple(class_names) if class_names is not None else tuple(meta["class_names"])
    # np.array copies out of the read-only memory map: the tensors are writable and the file is closed.
    return EmbeddingSet(torch.from_numpy(np.array(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64)), names)


def _chunk_file(folder: Path, i: int) -> Path:
    return folder / "chunks" / f"{i:06d}.npy"


def _chunk_ok(path: Path, rows: int, dtype: str) -> bool:
    """Whether a finished chunk file exists with the expected rows and dtype (reads the header only).

    A chunk left by a run with another ``chunk_size``, or damaged on disk, is encoded again.
    """
    if not path.exists():
        return False
    try:
        arr = np.load(path, mmap_mode="r")
        ok = arr.ndim == 2 and arr.shape[0] == rows and arr.dtype == _DTYPES[dtype]
    except (ValueError, OSError) as e:
        log.warning("unreadable cache chunk %s (%s): encoding it again", path, e)
        return False
    if not ok:
        log.warning("cache chunk %s has shape %s %s, expected %d rows of %s: encoding it again",
                    path, arr.shape, arr.dtype, rows, dtype)
    return ok


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            try:
                np.save(f, array)
            except OSError as e:  # numpy's short write ("N requested and M written") names no file
                text = f"{path}: cannot write the embedding cache ({e.strerror or e}); is the disk full?"
                raise (OSError(e.errno, text) if e.errno else OSError(text)) from None

    atomic_write(path, write)


def encode_dataset(
    encoder: Any,
    dataset: Any,
    folder: str | os.PathLike,
    indices: np.ndarray,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    chunk_size: int | None = None,
    dtype: str = "float32",
    amp: str | None = None,
    progress: bool = True,
) -> None:
    """Encode ``dataset[indices]`` into ``folder/chunks``, skipping chunks already written.

    Under ``torch.distributed`` each rank encodes every W-th chunk; callers merge afterwards.
    """
    folder = Path(folder)
    chunk_size = chunk_size or 16 * batch_size
    num_chunks = max(1, -(-len(indices) // chunk_size))
    rank, world = rank_and_world()
    mine = [i for i in range(rank, num_chunks, world)
            if not _chunk_ok(_chunk_file(folder, i), len(indices[i * chunk_size:(i + 1) * chunk_size]), dtype)]
    if not mine:
        return
    batches, owner = [], []
    for c in mine:
        rows = indices[c * chunk_size:(c + 1) * chunk_size]
        for b in range(0, len(rows), batch_size):
            batches.append(rows[b:b + batch_size].tolist())
            owner.append(c)
    device = encoder.device
    cuda = device.type == "cuda"
    if cuda:
        encoder.to(memory_format=torch.channels_last)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=cuda,
                        persistent_workers=False, prefetch_factor=4 if num_workers else None,
                        worker_init_fn=worker_init)
    autocast = torch.autocast(device.type, dtype=_AMP[amp]) if amp else nullcontext()
    pending: dict[int, list[np.ndarray]] = {}
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, unit="img", desc=f"encode {getattr(dataset, 'name', '')}/{getattr(dataset, 'split', '')}"
               + (f" rank {rank}" if world > 1 else ""), disable=not progress, dynamic_ncols=True)
    start, done = time.perf_counter(), 0
    try:
        for (images, _), c in zip(loader, owner):
            images = images.to(device, non_blocking=True)
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                feats = encoder.encode(images)
            if not torch.isfinite(feats).all():
                raise RuntimeError(f"encoder {encoder.name} produced NaN/inf embeddings (chunk {c}); "
                                   "check the input images and the amp setting")
            pending.setdefault(c, []).append(feats.cpu().numpy().astype(_DTYPES[dtype]))
            rows = indices[c * chunk_size:(c + 1) * chunk_size]
            if sum(len(p) for p in pending[c]) == len(rows):
                _save_npy(_chunk_file(folder, c), np.concatenate(pending.pop(c)))
            done += len(images)
            bar.update(len(images))
            bar.set_postfix_str(f"{done / (time.perf_counter() - start):.1f} img/s")
    finally:
        bar.close()


def _merge(folder: Path, num_chunks: int, labels: np.ndarray, meta: dict[str, Any]) -> None:
    """Concatenate the chunks into ``embeddings.npy`` + ``labels.npy`` and write ``meta.json`` last."""
    parts = [np.load(_chunk_file(folder, i)) for i in range(num_chunks)]
    x = np.concatenate(parts) if parts else np.zeros((0, meta["embed_dim"]), _DTYPES[meta["dtype"]])
    if x.shape[0] != len(labels):
        raise RuntimeError(f"embedding cache {folder}: {x.shape[0]} embeddings for {len(labels)} labels")
    _save_npy(folder / "embeddings.npy", x)
    _save_npy(folder / "labels.npy", labels)
    sums = {name: sha256_file(folder / name) for name in ("embeddings.npy", "labels.npy")}
    atomic_write_json(folder / "meta.json", {**meta, "shape": list(x.shape), "sha256": sums})
    for i in range(num_chunks):
        _chunk_file(folder, i).unlink(missing_ok=True)


def embed_split(
    encoder_name: str,
    dataset_name: str,
    split: str,
    *,
    cache_dir: str | os.PathLike = "~/.cache/dkvb/embeddings",
    image_size: int | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    chunk_size: int | None = None,
    dtype: str = "float32",
    limit: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    amp: str | None = None,
    pretrained: bool = True,
    progress: bool = True,
) -> EmbeddingSet:
    """Embeddings of one dataset split, from the cache or encoded now (and cached).

    Args:
        encoder_name, image_size, pretrained: see :func:`dkvb.encoders.create_encoder`.
        dataset_name, split, dataset_kwargs: see :func:`dkvb.datasets.load_dataset`.
        cache_dir: root of the cache.
        batch_size, num_workers: encoder batch and DataLoader workers.
        chunk_size: rows per resumable chunk (default 16 batches).
        dtype: ``float32`` or ``float16`` on disk (always float32 in memory).
        limit, seed: encode a seeded random subset of ``limit`` rows (tests, quick runs).
        device, amp: where to encode, and ``bf16``/``fp16`` autocast.
    """
    from . import encoders
    from .datasets import load_dataset

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if amp is not None and amp not in _AMP:
        raise ValueError(f"amp must be None or one of {sorted(_AMP)}, got {amp!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dataset = load_dataset(dataset_name, split, **(dataset_kwargs or {}))
    indices = subset_indices(len(dataset), limit, seed)
    # The key needs only the encoder's description: a cache hit loads (or downloads) no weights.
    described = encoders.encoder_config(encoder_name, image_size=image_size, pretrained=pretrained)
    key = {
        "format": FORMAT_VERSION, "encoder": described, "dataset": dataset_name, "split": split,
        "root": dataset.root, "limit": None if len(indices) == len(dataset) else [int(limit or 0), seed],
        "dtype": dtype, "amp": amp,
    }
    paths = getattr(dataset.images, "paths", None) if hasattr(dataset, "images") else None
    if paths is not None:  # images read from files: key by the files, not only the folder's path
        key["files"] = files_digest(paths)
    folder = cache_path(cache_dir, key)
    if (folder / "meta.json").exists():
        log.info("embedding cache hit: %s", folder)
        return load_cached(folder, dataset.class_names)
    encoder = encoders.create_encoder(encoder_name, image_size=image_size, device=device, pretrained=pretrained)
    if encoder.config() != described:
        raise RuntimeError(f"encoder {encoder_name!r} describes itself as {encoder.config()} once its weights are "
                           f"loaded but as {described} without them; the cache key would be wrong")
    folder.mkdir(parents=True, exist_ok=True)
    dataset.transform = encoder.preprocess
    chunk_size = chunk_size or 16 * batch_size
    encode_dataset(encoder, dataset, folder, indices, batch_size=batch_size, num_workers=num_workers,
                   chunk_size=chunk_size, dtype=dtype, amp=amp, progress=progress)
    barrier()
    rank, _ = rank_and_world()
    if rank == 0 and not (folder / "meta.json").exists():
        meta = {**key, "embed_dim": encoder.embed_dim, "class_names": list(dataset.class_names),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _merge(folder, max(1, -(-len(indices) // chunk_size)), dataset.targets[indices].astype(np.int64), meta)
    barrier()
    return load_cached(folder, dataset.class_names)
