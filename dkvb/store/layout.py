"""What a model store looks like on disk: file and version names, ``HEAD`` and the served version.

See :mod:`dkvb.store` for the layout. A store with an audit log (:mod:`dkvb.audit`) serves the
version its last verified record names: readers that ask for the current model get that version
even when a writer was killed before moving ``HEAD`` or ``HEAD`` is missing or corrupt, and a log
that does not verify serves nothing.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .. import audit
from ..errors import StoreError

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # what this dkvb writes; 2 adds per-tensor digests and shared tensors, 3 manifest_sha256
READABLE_FORMATS = (1, 2, 3)
TENSORS, CONFIG, MANIFEST, LOCK, ISSUED = (
    "tensors.safetensors", "config.json", "manifest.json", ".lock", ".issued")
VERSION_NAME = re.compile(r"^\d{6}$")


def current_version(path: str | os.PathLike) -> str | None:
    """The version ``HEAD`` points to, or ``None`` for an empty/new store."""
    head = Path(path) / "HEAD"
    return head.read_bytes().decode("utf-8", errors="replace").strip() if head.is_file() else None


def served_version(path: str | os.PathLike) -> str | None:
    """The version the store serves: the last verified audit record's ``version_after`` for a
    served store (the log is the commit point, see :mod:`dkvb.audit`), else ``HEAD``'s. Raises
    :class:`~dkvb.errors.AuditError` for a log that does not verify (:func:`dkvb.audit.served_state`)."""
    state = audit.served_state(path)
    if state is None:
        return current_version(path)
    warn_broken_head(path, state[0])
    return state[0]


def warn_broken_head(path: str | os.PathLike, served: str) -> None:
    """Log a warning when a served store's ``HEAD`` is missing or not a version name: the log
    decides what is served, but a broken ``HEAD`` means something outside dkvb wrote the store."""
    head = current_version(path)
    if head is None or not VERSION_NAME.match(head):
        log.warning("%s: HEAD is %s; serving version %s, which the audit log names (the next forget, restore "
                    "or prune rewrites HEAD)", path, "missing" if head is None else f"corrupt ({head[:40]!r})", served)


def list_versions(path: str | os.PathLike) -> list[str]:
    root = Path(path) / "versions"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and VERSION_NAME.match(p.name)) if root.is_dir() else []


def version_dir(root: Path, version: str | None) -> Path:
    if not root.is_dir():
        raise StoreError(f"no stored model at {root}")
    version = version or served_version(root)
    if version is None:
        raise StoreError(f"{root}: HEAD is missing; not a dkvb model store")
    if not VERSION_NAME.match(version):
        raise StoreError(f"{root}: {version!r} is not a version name (six digits); HEAD or the request is corrupt")
    vdir = root / "versions" / version
    if not vdir.is_dir():
        raise StoreError(f"{root}: version {version} does not exist (have {list_versions(root)})")
    return vdir

