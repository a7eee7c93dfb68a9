"""Which code produced a result, so a results page can say it: the git commit of the checkout
the package runs from (``+dirty`` when tracked files under ``dkvb/`` differ from it), else the
package version."""
from __future__ import annotations

import subprocess
import time
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=None)
def code_version() -> str:
    """``<short commit>`` or ``<short commit>+dirty`` in a git checkout; ``dkvb <version>`` otherwise."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "dkvb")
        return commit + ("+dirty" if dirty else "")
    try:
        return f"dkvb {version('dkvb')}"
    except PackageNotFoundError:
        return "unknown"


def run_date() -> str:
    """Today's date in UTC, ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime())
