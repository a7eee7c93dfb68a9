"""Isolation for the whole test session: the tests (the notebook's kernel included) write only to a temporary folder.

Before any test runs, ``HOME``, ``DKVB_CACHE``, ``DKVB_DATA`` and ``MPLCONFIGDIR`` point into one
fresh temporary folder, removed at the end; the notebook's kernel is a child process and inherits
them. So an embedding cache, an unpacked dataset, matplotlib's font cache or IPython's profile
never lands in the user's home.

The user's own embedding cache (``$DKVB_CACHE`` or ``~/.cache/dkvb/embeddings`` as it was before
the test session) is still read where it exists: each complete entry (a folder with ``meta.json``,
which the cache never writes to again) is linked into the temporary cache, so e.g. the notebook
reuses real Fashion-MNIST embeddings, while any new entry is written in the temporary cache.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ISOLATED = ("HOME", "DKVB_CACHE", "DKVB_DATA", "MPLCONFIGDIR")
_SAVED = pytest.StashKey[dict]()  # the variables' values before the test session
_ROOT = pytest.StashKey[Path]()  # the test session's temporary folder


def link_complete_entries(source: Path, target: Path) -> int:
    """Symlink every complete cache entry under ``source`` to the same place under ``target``
    (the folders above an entry are created, so new entries never go into ``source``)."""
    linked = 0
    for meta in sorted(source.rglob("meta.json")) if source.is_dir() else []:
        entry = meta.parent
        link = target / entry.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(entry, target_is_directory=True)
        linked += 1
    return linked


def pytest_configure(config: pytest.Config) -> None:
    user_cache = Path(os.environ.get("DKVB_CACHE", "~/.cache/dkvb/embeddings")).expanduser()
    root = Path(tempfile.mkdtemp(prefix="dkvb-tests-"))
    paths = {"HOME": root / "home", "DKVB_CACHE": root / "cache", "DKVB_DATA": root / "data",
             "MPLCONFIGDIR": root / "matplotlib"}
    for path in paths.values():
        path.mkdir()
    link_complete_entries(user_cache, paths["DKVB_CACHE"])
    config.stash[_SAVED] = {name: os.environ.get(name) for name in ISOLATED}
    config.stash[_ROOT] = root
    os.environ.update({name: str(path) for name, path in paths.items()})


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in config.stash.get(_SAVED, {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if _ROOT in config.stash:
        shutil.rmtree(config.stash[_ROOT], ignore_errors=True)
