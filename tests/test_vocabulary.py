"""The repository speaks of the project, not of the periods in which it was made.

Every tracked text file is scanned for words that narrate how the work went ("the ninth
session", "this session", "in the twelfth", "docs/quality.md item 14") rather than what the code
does. Where a date matters a page gives the date; where a version matters, the git commit or the
package version; history lives in CHANGELOG.md. Technical uses (pytest's fixture scopes, HTTP
sessions) are allowed by :data:`ALLOWED`.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".cfg", ".toml", ".ipynb", ".sh", ".txt", ".ini"}
EXTRA = {".ci/run"}  # tracked scripts without a suffix

_ORDINALS = ("fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|fourteenth|fifteenth|"
             "sixteenth|seventeenth|eighteenth|nineteenth|twentieth")
FORBIDDEN = {
    "session": re.compile(r"\bsessions?\b", re.IGNORECASE),
    # "in the twelfth", "since the ninth", "the eleventh's": an ordinal naming a period. A fraction
    # ("a tenth of the activations", "the tenth-of-the-activations floor") is not one.
    "ordinal period": re.compile(rf"\b(?:this|that|since|until|before|after|in|by|from|the)\s+(?:{_ORDINALS})\b"
                                 r"(?!(?:'s)?[\s-]+(?:of|part)\b)", re.IGNORECASE),
    "stale pointer": re.compile(r"quality\.md,?\s+items?\s+\d", re.IGNORECASE),
    # "the issue-3 baselines", "issue 29's targets": the tracker's numbering, not what the code does
    "issue pointer": re.compile(r"\bissues?[\s-]+#?\d+", re.IGNORECASE),
}
# Technical uses of "session", matched against the line around the hit.
ALLOWED = [
    re.compile(r"scope\s*=\s*['\"]session['\"]"),  # pytest fixture scope
    re.compile(r"\b(?:pytest|test)\s+session\b", re.IGNORECASE),  # the pytest run itself
    re.compile(r"\brequests\.Session\b|\bSession\(\)|\bhttp\w*\s+session", re.IGNORECASE),  # HTTP sessions
    re.compile(r"\btest_session_\w+"),  # a test's name
]
THIS_FILE = Path(__file__).resolve().relative_to(REPO).as_posix()


def tracked_text_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = [f for f in out.split("\0") if f]
    return [f for f in files if (Path(f).suffix in SUFFIXES or f in EXTRA or f.startswith("scripts/"))
            and f != THIS_FILE and (REPO / f).is_file()]


def hits(line: str) -> list[str]:
    """The forbidden words of ``line`` that no :data:`ALLOWED` pattern covers."""
    found = []
    for kind, pattern in FORBIDDEN.items():
        for m in pattern.finditer(line):
            if kind == "session" and any(a.search(line) for a in ALLOWED):
                continue
            found.append(f"{kind}: {m.group(0)!r}")
    return found


def test_the_scan_catches_narration_and_allows_technical_uses():
    assert hits("rerun in the ninth session with the 1.0x rule")
    assert hits("the default since the twelfth") and hits("(the eleventh's fresh-clone demo)")
    assert hits("measured this session") and hits("see docs/quality.md item 14")
    assert hits("registers the issue-3 baselines") and hits("Against issue 29's targets") and hits("(issues 12 and 31)")
    assert not hits('@pytest.fixture(scope="session")')
    assert not hits("the test session writes only to temporary folders")
    assert not hits("at least a tenth of the activations") and not hits("the tenth-of-the-activations floor")
    assert not hits("a fourteenth of retraining the linear head") and not hits("the 8th of 50 requests")


def test_no_process_narration_in_the_repository():
    problems = []
    for name in tracked_text_files():
        try:
            text = (REPO / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            problems += [f"{name}:{number}: {hit}" for hit in hits(line)]
    assert not problems, ("words about the periods in which the work was done (give a date, a commit or "
                          "nothing; history goes to CHANGELOG.md):\n" + "\n".join(problems))
