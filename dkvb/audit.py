"""Audit log of a model store: one JSON line per request, hash-chained, anchored, optionally keyed.

Files in the store folder::

    audit.jsonl         one record per line, appended and fsynced
    audit.anchor.json   {"records": N, "last_sha256": "..."}: the log as last committed (+ "mac")

Record format. Every record has ``request_id`` (``req-000001``, ...), ``op`` (``origin``: the model
requests start from; ``forget``; ``restore``; ``prune``), ``time`` (UTC), ``version_after`` (the
version served after it) and ``prev_sha256``, the sha256 of the previous line (``null`` on the
first), which chains each line to the one before. :mod:`dkvb.service` adds the fields of each op.

Anchor. After each append the anchor is replaced atomically with the log's length and the sha256
of its last line, so losing the tail is detected: an emptied, deleted or cut log is shorter than
its anchor, and an edited last line no longer has the anchored digest. The log is the commit point:
a writer killed after appending but before replacing the anchor leaves exactly one record past
the anchor that chains to it; that record counts as committed and the next writer anchors it.

Key. With a key (:func:`audit_key`: the file named by ``DKVB_AUDIT_KEY_FILE`` or the value of
``DKVB_AUDIT_KEY``) every line gets ``mac``, an HMAC-SHA256 of the line without it, and the anchor
gets one too. Without the key nobody can recompute a valid chain after editing, cutting or
inserting lines. Without a key the chain detects edits and losses made by accident or by tools
that do not know the format, but someone who rewrites the log and recomputes every
``prev_sha256`` and the anchor is not detected. A keyed log can only be appended to with the key,
and stays keyed: a record or anchor without a ``mac`` after a keyed record is refused, with or
without the key at hand.

Marker. ``audit.started.json`` is written once the first record is anchored and never removed: it
holds the sha256 of the log's first line and whether the log is keyed (with a mac when it is). A
store that has it and has lost its log or anchor has lost its history, and a log whose first line
differs was replaced.

Recovery. A tail that does not verify (a line edited, forged or written without the key past the
anchored records) is refused by every reader, naming the record; :meth:`AuditLog.recover` (``dkvb
recover``) moves it to ``audit.rejected.jsonl`` so the store serves the last verified record again.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import AuditError
from .io import atomic_write_bytes, atomic_write_json, fsync_dir

log = logging.getLogger("dkvb")

LOG, ANCHOR, MARKER, REJECTED = "audit.jsonl", "audit.anchor.json", "audit.started.json", "audit.rejected.jsonl"
RECOVER_HINT = "`dkvb recover --model {root}` serves the last verified record again"
KEY_ENV, KEY_FILE_ENV = "DKVB_AUDIT_KEY", "DKVB_AUDIT_KEY_FILE"


def audit_key() -> bytes | None:
    """The HMAC key from ``$DKVB_AUDIT_KEY_FILE`` (the file's bytes, trailing newline stripped) or
    ``$DKVB_AUDIT_KEY``; ``None`` when neither is set. Raises :class:`AuditError` for an empty or
    unreadable key."""
    path = os.environ.get(KEY_FILE_ENV)
    if path:
        try:
            key = Path(path).read_bytes().rstrip(b"\r\n")
        except OSError as e:
            raise AuditError(f"{KEY_FILE_ENV}={path}: cannot read the audit key ({e.strerror})") from None
        if not key:
            raise AuditError(f"{KEY_FILE_ENV}={path}: the audit key file is empty")
        return key
    value = os.environ.get(KEY_ENV)
    if value is not None and not value:
        raise AuditError(f"{KEY_ENV} is set but empty")
    return value.encode() if value else None


def line_sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def encode(record: dict[str, Any], prev: str | None, key: bytes | None) -> bytes:
    """The log line of ``record`` chained to the line whose sha256 is ``prev`` (and keyed)."""
    body = _dumps({**record, "prev_sha256": prev})
    return _dumps({**json.loads(body), "mac": _mac(key, body)}) if key else body


def _anchor_body(records: int, last: str | None) -> bytes:
    return f"{records}|{last}".encode()


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


def _read_anchor(root: Path, key: bytes | None, keyed: bool) -> tuple[int, str | None] | None:
    """(records, last_sha256) of the anchor, its mac checked under ``key`` (and required when the
    log is ``keyed``); ``None`` without an anchor."""
    file = root / ANCHOR
    if not file.is_file():
        return None
    try:
        anchor = json.loads(file.read_text())
        anchored, digest = anchor["records"], anchor["last_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AuditError(f"{file}: corrupt anchor ({type(e).__name__}: {e})") from None
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
    if not file.is_file():
        return None
    try:
        marker = json.loads(file.read_text())
        first, keyed = marker["first_sha256"], marker["keyed"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AuditError(f"{file}: corrupt marker ({type(e).__name__}: {e})") from None
    if key is not None and keyed and not hmac.compare_digest(str(marker.get("mac")), _mac(key, _marker_body(first))):
        raise AuditError(f"{file}: field mac does not match under the audit key; the marker was replaced")
    return {"first_sha256": first, "keyed": bool(keyed)}


def _marker_body(first: str) -> bytes:
    return f"started|{first}|keyed".encode()


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


class AuditLog:
    """The appending side of the log of the store at ``path``; the caller holds the writer lock.

    :meth:`sync` reads and verifies the log (dropping an unfinished last line, anchoring a pending
    record), :meth:`append` adds one record: write, fsync, then replace the anchor.
    """

    def __init__(self, path: str | os.PathLike, key: bytes | None = None) -> None:
        self.root, self.key = Path(path), key
        self.count, self.prev = 0, None
        self.unanchored: OSError | None = None  # why the last final append left its record unanchored

    @property
    def file(self) -> Path:
        return self.root / LOG

    def sync(self) -> list[dict[str, Any]]:
        """The verified records; raises :class:`AuditError` for a keyed log without the key."""
        if self.file.is_file():
            data = self.file.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                log.warning("%s: dropping an unfinished last line left by a killed writer", self.file)
                with open(self.file, "r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())
        state = load(self.root, self.key)
        if self.key is None and any("mac" in r for r in state.records):
            raise AuditError(f"{self.file} is keyed (its records carry a mac): set {KEY_ENV} or {KEY_FILE_ENV} "
                             "to append to it")
        self.count, self.prev = len(state.records), state.last_sha256
        if state.pending:
            log.warning("%s: %s was logged but not anchored (killed writer); anchoring it", self.file,
                        state.records[-1]["request_id"])
            self._anchor()
        if state.records and not (self.root / MARKER).is_file():
            self._mark()
        return state.records

    def recover(self) -> list[bytes]:
        """Move the lines past the anchored records that do not verify (a forged or unkeyed tail)
        to ``audit.rejected.jsonl``, so the log ends at its last verified record; returns the moved
        lines (none when the whole log verifies). Raises :class:`AuditError` where the damage lies
        inside the anchored history, which no recovery may drop."""
        lines = _lines(self.file)
        if lines is None:
            raise AuditError(f"{self.file} is missing: nothing to recover from")
        records, shas, bad = _verify_lines(self.file, lines, self.key)
        keyed = any("mac" in r for r in records) or bool((read_marker(self.root, self.key) or {}).get("keyed"))
        anchor = _read_anchor(self.root, self.key, keyed) if (self.root / ANCHOR).is_file() else None
        n = anchor[0] if anchor is not None else 0
        if bad is None:  # every line verifies: at most one (a killed writer's) may lie past the anchor
            if anchor is None or len(records) <= n + 1:
                return []
            bad = _Bad(n + 2, records[n + 1]["request_id"], ": a second record past the anchor")
            records, shas = records[:n], shas[:n]
        if keyed and self.key is None:
            raise AuditError(f"{self.file} is keyed: set {KEY_ENV} or {KEY_FILE_ENV} to recover it (line {bad.n} does "
                             "not verify)")
        if anchor is None or bad.n <= n or (n and shas[n - 1] != anchor[1]):
            raise AuditError(f"{self.file}: line {bad.n}{bad.problem}; it lies inside the anchored history "
                             f"({n} records), which recovery does not drop: restore the log from a backup")
        dropped = lines[len(records):]
        with open(self.root / REJECTED, "ab") as f:
            f.write(b"".join(line + b"\n" for line in dropped))
            f.flush()
            os.fsync(f.fileno())
        atomic_write_bytes(self.file, b"".join(line + b"\n" for line in lines[:len(records)]))
        fsync_dir(self.root)
        return dropped

    def next_id(self, ahead: int = 0) -> str:
        """The request id of the record after the next ``ahead`` ones."""
        return f"req-{self.count + 1 + ahead:06d}"

    def append(self, fields: dict[str, Any], *, final: bool = False) -> dict[str, Any]:
        """Append a record (``op`` and ``version_after`` required) with the next id and the time;
        returns it as logged.

        The fsynced line is the commit point: with ``final``, a failure to replace the anchor
        afterwards (a full disk) is a warning, kept in :attr:`unanchored`, since the record is
        committed and the next writer anchors it."""
        record = {"request_id": self.next_id(), "op": fields["op"], "time": now(), **fields}
        line = encode(record, self.prev, self.key)
        new = not self.file.exists()
        with open(self.file, "ab") as f:
            f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.root)
        self.count, self.prev = self.count + 1, line_sha(line)
        try:
            self._anchor()
            if self.count == 1:
                self._mark()
        except OSError as e:
            if not final:
                raise
            self.unanchored = e
            log.warning("%s: %s is committed, but the anchor could not be replaced (%s); the next request "
                        "anchors it", self.file, record["request_id"], e)
        return record

    def _mark(self) -> None:
        """Write the marker: the store has served requests (sha256 of the first line, keyed or not)."""
        first = line_sha((_lines(self.file) or [b""])[0])
        marker: dict[str, Any] = {"first_sha256": first, "keyed": self.key is not None}
        if self.key is not None:
            marker["mac"] = _mac(self.key, _marker_body(first))
        atomic_write_json(self.root / MARKER, marker)

    def _anchor(self) -> None:
        anchor: dict[str, Any] = {"records": self.count, "last_sha256": self.prev}
        if self.key is not None:
            anchor["mac"] = _mac(self.key, _anchor_body(self.count, self.prev))
        atomic_write_json(self.root / ANCHOR, anchor)


__all__ = ["AuditLog", "LogState", "load", "read_log", "last_record", "is_served", "audit_key", "encode",
           "line_sha", "read_marker", "served_origin", "served_state", "LOG", "ANCHOR", "MARKER", "REJECTED", "KEY_ENV",
           "KEY_FILE_ENV"]
