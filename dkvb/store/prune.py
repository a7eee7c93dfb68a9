"""Deleting the versions of a store that nothing needs any more."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from ..errors import StoreError
from ..io import fsync_dir
from .layout import current_version, list_versions, served_version
from .lock import clean_leftovers, writer_lock
from .read import read_manifest


def prune(path: str | os.PathLike, keep: Iterable[str] = (), *, dry_run: bool = False,
          before_delete: Callable[[list[str]], None] | None = None) -> list[str]:
    """Delete every version but the served one, ``HEAD``'s, those in ``keep`` and the full versions
    any of them shares tensors with; returns the deleted names (``dry_run``: those it would delete).

    Every version to delete is checked first (a real folder, not a symbolic link), then
    ``before_delete(names)`` runs (the service logs them there, so no version goes unrecorded even
    when the prune is killed), then each is renamed out of sight and removed, so a killed prune
    leaves no half-deleted version. Raises :class:`StoreError` where a kept version's manifest is
    unreadable (its base would be unknown) or a version folder is a link, before deleting anything.
    """
    root = Path(path)
    with writer_lock(root):
        clean_leftovers(root)
        existing = list_versions(root)
        wanted = {v for v in (served_version(root), current_version(root), *keep) if v in existing}
        if not wanted:
            raise StoreError(f"no stored model at {root}: nothing to keep, refusing to delete every version")
        needed = set(wanted)
        for v in wanted:
            info = read_manifest(root, v).get("shared")
            if isinstance(info, dict):
                needed.add(str(info.get("version")))
        doomed = [v for v in existing if v not in needed]
        links = [v for v in existing if (root / "versions" / v).is_symlink()]
        if links:
            raise StoreError(f"{root / 'versions' / links[0]} is a symbolic link, not a version folder of the store; "
                             "refusing to prune (replace it by the folder it points to, or remove it)")
        if doomed and not dry_run and before_delete is not None:
            before_delete(doomed)
        if not dry_run:
            for v in doomed:
                _remove(root, v, "pruned")
            fsync_dir(root / "versions")
    return doomed


def discard_orphan(path: str | os.PathLike, version: str) -> None:
    """Remove ``version``, a version no logged request wrote and nothing rests on (the caller, holding
    the writer lock, has checked that: the newest version, left by a writer killed before logging).
    Renamed out of sight first, so a killed removal leaves only a ``.tmp-*`` leftover that the next
    save or prune deletes, never a half-deleted version."""
    root = Path(path)
    with writer_lock(root):
        if version in (served_version(root), current_version(root)):
            raise StoreError(f"{root}: version {version} is served or HEAD's; refusing to discard it")
        for v in list_versions(root):
            info = read_manifest(root, v).get("shared") if v != version else None
            if isinstance(info, dict) and info.get("version") == version:
                raise StoreError(f"{root}: version {v} shares tensors with version {version}; refusing to discard it")
        _remove(root, version, "orphan")
        fsync_dir(root / "versions")


def _remove(root: Path, version: str, why: str) -> None:
    gone = root / "versions" / f".tmp-{why}-{version}"
    shutil.rmtree(gone, ignore_errors=True)  # a killed removal's leftover of the same name
    os.replace(root / "versions" / version, gone)
    shutil.rmtree(gone)

