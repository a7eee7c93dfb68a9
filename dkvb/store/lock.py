"""The store's writer lock, and the cleanup of what killed writers left behind.

Every writer holds ``.lock`` (``filelock``, i.e. ``flock``): a second concurrent writer fails at
once with :class:`StoreLockedError` instead of interleaving. The kernel drops the lock when its
holder dies, so a killed writer never leaves a stale lock.
"""
from __future__ import annotations

import errno
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import filelock

from ..errors import StoreError, StoreLockedError
from .layout import LOCK

_HELD: dict[tuple[str, int], list] = {}  # (store, thread) -> [FileLock, depth]


@contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the store's writer lock; re-entrant within one thread, fails at once elsewhere.

    Raises :class:`StoreLockedError` when another process (or thread) is writing to the store, and
    :class:`StoreError` naming the store when it cannot be written (a read-only file system, no
    permission), whether taking the lock or inside the block.
    """
    root = Path(path)
    with _unwritable_names(root):
        root.mkdir(parents=True, exist_ok=True)
    key = (str(root.resolve()), threading.get_ident())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    lock = filelock.FileLock(str(root / LOCK), timeout=0)
    try:
        with _unwritable_names(root):
            lock.acquire()
    except filelock.Timeout:
        raise StoreLockedError(
            f"{root}: another writer holds the store lock ({root / LOCK}); wait for it to finish and retry"
        ) from None
    _HELD[key] = [lock, 1]
    try:
        with _unwritable_names(root):
            yield
    finally:
        del _HELD[key]
        lock.release()


@contextmanager
def _unwritable_names(root: Path) -> Iterator[None]:
    """Turn a write refused by the file system (read-only, no permission) into a :class:`StoreError`
    that names the store and the file, instead of a bare errno."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise StoreError(f"{root}: cannot write to the model store ({e.strerror}: {e.filename}); requests need a "
                         "writable store: check the file system is mounted read-write and the permissions") from e


def clean_leftovers(root: Path) -> None:
    """Remove what killed writers left behind (called with the lock held, so no writer is active)."""
    versions = root / "versions"
    if versions.is_dir():
        for p in versions.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in versions.glob(".*.tmp"):
            p.unlink(missing_ok=True)
    for p in root.glob(".*.tmp"):
        p.unlink(missing_ok=True)

