"""Relative links in the tracked markdown files point at files that exist, and their anchors at
an explicit ``<a id>`` or a heading of the target page."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    ids = set(re.findall(r"<a id=\"([^\"]+)\"", text))
    for heading in re.findall(r"^#+\s+(.+)$", text, flags=re.MULTILINE):  # GitHub's slugs
        ids.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return ids


def test_relative_links_resolve():
    files = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    broken = []
    for name in files.split():
        page = REPO / name
        if not page.is_file():
            continue
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{name}: {target} (no such anchor)")
    assert not broken, "\n".join(broken)
