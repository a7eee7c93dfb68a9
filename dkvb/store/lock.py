"""The store's writer lock, and the cleanup of what killed writers left behind.

Every writer holds ``.lock`` (``filelock``, i.e. ``flock``): a second concurrent writer fails at
once with :class:`StoreLockedError` instead of interleaving. The kernel drops the lock when its
holder dies, so a killed writer never leaves a stale lock.
"""
from __future__ import annotations

import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import filelock

from ..errors import StoreLockedError
from .layout import LOCK

_HELD: dict[tuple[str, int], list] = {}  # (store, thread) -> [FileLock, depth]


@contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the store's writer lock; re-entrant within one thread, fails at once elsewhere.

    Raises :class:`StoreLockedError` when another process (or thread) is writing to the store.
    """
    root = Path(path)
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
        lock.acquire()
    except filelock.Timeout:
        raise StoreLockedError(
            f"{root}: another writer holds the store lock ({root / LOCK}); wait for it to finish and retry"
        ) from None
    _HELD[key] = [lock, 1]
    try:
        yield
    finally:
        del _HELD[key]
        lock.release()


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

