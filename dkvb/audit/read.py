"""Reading and verifying the audit log: chain, anchor, marker and macs; what a reader serves."""
from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AuditError
from .format import ANCHOR, LOG, MARKER, RECOVER_HINT, _anchor_body, _dumps, _mac, _marker_body, audit_key, line_sha


@dataclass
class LogState:
    """A verified log: its records, the sha256 of its last line and whether that record is
    committed but not yet anchored (its writer was killed before replacing the anchor)."""

    records: list[dict[str, Any]]
    last_sha256: str | None
    pending: bool = False


class _Bad(Exception):
    """A line that does not verify: its number, request id (when readable) and the problem."""

    def __init__(self, n: int, rid: str | None, problem: str) -> None:
        super().__init__(problem)
        self.n, self.rid, self.problem = n, rid, problem


def _verify_lines(file: Path, lines: list[bytes], key: bytes | None) -> tuple[list[dict[str, Any]], list[str],
                                                                               _Bad | None]:
    """The records of the longest verified prefix of ``lines``, their sha256s, and why the next line
    does not verify (``None`` when all do): JSON, fields, chain, and every mac with ``key``; without
    ``key``, no line without a mac after a keyed one."""
    records: list[dict[str, Any]] = []
    shas: list[str] = []
    keyed = False
    for n, line in enumerate(lines, 1):
        prev = shas[-1] if shas else None
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return records, shas, _Bad(n, None, f" is not a JSON record ({e}); the audit log is corrupt")
        if not isinstance(record, dict) or not {"op", "request_id", "version_after"} <= set(record) \
                or not isinstance(record["version_after"], str):
            return records, shas, _Bad(n, None, " is not an audit record; the audit log is corrupt")
        rid = str(record["request_id"])
        if record.get("prev_sha256") != prev:
            return records, shas, _Bad(n, rid, f": field prev_sha256 does not match line {n - 1}; the audit log was "
                                               "edited or lines were removed")
        mac = record.pop("mac", None)
        if key is not None:
            if mac is None or not hmac.compare_digest(str(mac), _mac(key, _dumps(record))):
                return records, shas, _Bad(n, rid, ": field mac " + ("is missing" if mac is None else "does not match")
                                           + " under the audit key; the line was edited or written without the key")
        elif keyed and mac is None:
            return records, shas, _Bad(n, rid, ": field mac is missing after keyed records; the log is keyed and "
                                               "this line was written or edited without the key")
        keyed = keyed or mac is not None
        if mac is not None:
            record["mac"] = mac
        records.append(record)
        shas.append(line_sha(line))
    return records, shas, None


def _lines(file: Path) -> list[bytes] | None:
    """The complete lines of the log (after the last newline: an unfinished append); ``None``
    without a log."""
    data = file.read_bytes() if file.is_file() else None
    return None if data is None else data.split(b"\n")[:-1]


def _read_json(file: Path, what: str, fields: tuple[str, ...]) -> dict[str, Any] | None:
    """The JSON object in ``file`` holding ``fields``; ``None`` without the file; AuditError naming
    ``what`` when it is unreadable, not an object or lacks a field."""
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
        for name in fields:
            data[name]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AuditError(f"{file}: corrupt {what} ({type(e).__name__}: {e})") from None
    return data


def _read_anchor(root: Path, key: bytes | None, keyed: bool) -> tuple[int, str | None] | None:
    """(records, last_sha256) of the anchor, its mac checked under ``key`` (and required when the
    log is ``keyed``); ``None`` without an anchor."""
    file = root / ANCHOR
    anchor = _read_json(file, "anchor", ("records", "last_sha256"))
    if anchor is None:
        return None
    anchored, digest = anchor["records"], anchor["last_sha256"]
    if type(anchored) is not int or anchored < 0:
        raise AuditError(f"{file}: field records must be a count, got {anchored!r}")
    mac = anchor.get("mac")
    if key is not None:
        if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, _anchor_body(anchored, digest))):
            raise AuditError(f"{file}: field mac does not match under the audit key; the anchor was replaced")
    elif keyed and mac is None:
        raise AuditError(f"{file}: field mac is missing though the log is keyed; the anchor was replaced without "
                         "the key")
    return anchored, digest


def read_marker(root: Path, key: bytes | None = None) -> dict[str, Any] | None:
    """The store's marker (it has served requests), its mac checked under ``key``; ``None`` without one."""
    file = root / MARKER
    marker = _read_json(file, "marker", ("first_sha256", "keyed"))
    if marker is None:
        return None
    first, keyed = marker["first_sha256"], marker["keyed"]
    if key is not None and keyed and not hmac.compare_digest(str(marker.get("mac")), _mac(key, _marker_body(first))):
        raise AuditError(f"{file}: field mac does not match under the audit key; the marker was replaced")
    return {"first_sha256": first, "keyed": bool(keyed)}


def load(path: str | os.PathLike, key: bytes | None = None) -> LogState:
    """Read and verify the log of the store at ``path``: chain, anchor, marker and, with ``key``,
    every mac (without it: no unkeyed record after a keyed one).

    A cut last line (an unfinished append of a killed writer) is skipped. Raises
    :class:`AuditError` naming the file and line (and the record) for anything else.
    """
    root = Path(path)
    file = root / LOG
    lines = _lines(file)
    marker = read_marker(root, key)
    if lines is None and marker is not None:
        raise AuditError(f"{file} is missing, but the store has served requests ({MARKER}): its history was "
                         "deleted; restore the log from a backup")
    records, shas, bad = _verify_lines(file, lines or [], key)
    keyed = any("mac" in r for r in records) or bool(marker and marker["keyed"])
    if records and marker is not None and marker["keyed"] and "mac" not in records[0]:
        bad = _Bad(1, records[0]["request_id"], f": field mac is missing, but the store's log is keyed ({MARKER}): the "
                   "macs were stripped")
    anchor = _read_anchor(root, key, keyed)
    if bad is not None:
        tail = anchor is not None and bad.n > anchor[0] and bad.n > 1
        raise AuditError(f"{file}: line {bad.n}{bad.problem}" + (f" (record {bad.rid})" if bad.rid else "")
                         + (f"; {RECOVER_HINT.format(root=root)}" if tail else ""))
    if key is not None:  # verified: the records as written, without their macs
        for r in records:
            r.pop("mac", None)
    if marker is not None and records and shas[0] != marker["first_sha256"]:
        raise AuditError(f"{file}: the first line differs from the one recorded in {MARKER}: the log was replaced")
    last = shas[-1] if shas else None
    return LogState(records, last, _check_anchor(root, anchor, len(records), last, records, marker is not None))


def _check_anchor(root: Path, anchor: tuple[int, str | None] | None, count: int, last: str | None,
                  records: list[dict[str, Any]], started: bool) -> bool:
    """Whether the last record is pending (logged, not yet anchored); raises where the log and its
    anchor disagree."""
    file = root / ANCHOR
    if anchor is None:  # before the first anchor: the log may hold the first record, pending
        if not started and (count == 0 or (count == 1 and records[0]["prev_sha256"] is None)):
            return count == 1
        raise AuditError(f"{file} is missing: {root / LOG} cannot be checked for lost lines (the anchor was "
                         "deleted, or the log was written by an older dkvb)")
    anchored, digest = anchor
    if count == anchored and digest == last:
        return False
    if count == anchored + 1 and records[-1]["prev_sha256"] == digest:
        return True
    if count < anchored:
        raise AuditError(f"{root / LOG} has {count} records but its anchor ({file.name}) has {anchored}: "
                         "the log was cut, emptied or deleted")
    if count == anchored:
        raise AuditError(f"{root / LOG}: the last line differs from the anchored one ({file.name}, field "
                         "last_sha256): the last record was edited")
    raise AuditError(f"{root / LOG} has {count} records but its anchor ({file.name}) has {anchored}: the anchor "
                     f"was replaced, or lines were appended by hand (from record {records[anchored]['request_id']}); "
                     + RECOVER_HINT.format(root=root))


def read_log(path: str | os.PathLike, key: bytes | None = None) -> list[dict[str, Any]]:
    """Records of the verified audit log, oldest first (see :func:`load`)."""
    return load(path, key).records


def served_origin(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The origin record the version served after ``records`` descends from (followed through
    restores); ``None`` without one."""
    origin: dict[str, Any] | None = None
    of: dict[str, dict[str, Any] | None] = {}
    for r in records:
        if r["op"] == "origin":
            origin = r
        elif r["op"] == "restore":
            origin = of.get(r.get("to"), origin)
        of[r["request_id"]] = origin
    return origin


def served_state(path: str | os.PathLike) -> tuple[str, dict[str, Any] | None, dict[str, Any]] | None:
    """(version served, its origin record, the last record) of a served store, read from the verified log (macs
    checked under :func:`audit_key`, and without it no unkeyed record after keyed ones); ``None``
    for a store without a log. Raises :class:`AuditError` for a log that does not verify or a
    store that lost its log."""
    root = Path(path)
    if not is_served(root):
        return None
    records = load(root, audit_key()).records
    return (records[-1]["version_after"], served_origin(records), records[-1]) if records else None


def last_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The last complete record of the log, read from its tail without verifying the chain (what a
    reader needs to find the served version); ``None`` without a log."""
    file = Path(path) / LOG
    try:
        f = open(file, "rb")
    except FileNotFoundError:
        return None
    with f:
        end, block = f.seek(0, os.SEEK_END), 4096
        while True:
            start = max(0, end - block)
            f.seek(start)
            data = f.read(end - start)
            cut = data.rfind(b"\n")  # the end of the last complete line
            begin = data.rfind(b"\n", 0, max(cut, 0))
            if cut < 0 and start == 0:
                return None
            if begin >= 0 or start == 0:
                line = data[begin + 1:cut]
                break
            block *= 4
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AuditError(f"{file}: the last line is not a JSON record ({e}); the audit log is corrupt") from None
    if not isinstance(record, dict) or not isinstance(record.get("version_after"), str):
        raise AuditError(f"{file}: the last line is not an audit record (field version_after)")
    return record


def is_served(path: str | os.PathLike) -> bool:
    """Whether the store at ``path`` has served requests (it has an audit log, its anchor or the marker)."""
    root = Path(path)
    return any((root / name).is_file() for name in (LOG, ANCHOR, MARKER))


