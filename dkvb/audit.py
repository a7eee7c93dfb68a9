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
``prev_sha256`` and the anchor is not detected. A keyed log can only be appended to with the key.
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
from .io import atomic_write_json, fsync_dir

log = logging.getLogger("dkvb")

LOG, ANCHOR = "audit.jsonl", "audit.anchor.json"
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


def load(path: str | os.PathLike, key: bytes | None = None) -> LogState:
    """Read and verify the log of the store at ``path``: chain, anchor and, with ``key``, every mac.

    A cut last line (an unfinished append of a killed writer) is skipped. Raises
    :class:`AuditError` naming the file and line for anything else.
    """
    root = Path(path)
    file = root / LOG
    data = file.read_bytes() if file.is_file() else None
    records, prev = [], None
    for n, line in enumerate((data or b"").split(b"\n")[:-1], 1):  # after the last newline: an unfinished append
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AuditError(f"{file}: line {n} is not a JSON record ({e}); the audit log is corrupt") from None
        if not isinstance(record, dict) or not {"op", "request_id", "version_after"} <= set(record):
            raise AuditError(f"{file}: line {n} is not an audit record; the audit log is corrupt")
        if record.get("prev_sha256") != prev:
            raise AuditError(f"{file}: line {n}: field prev_sha256 does not match line {n - 1}; "
                             "the audit log was edited or lines were removed")
        if key is not None:
            mac = record.pop("mac", None)
            if mac is None or not hmac.compare_digest(mac, _mac(key, _dumps(record))):
                raise AuditError(f"{file}: line {n}: field mac " + ("is missing" if mac is None else "does not match")
                                 + " under the audit key; the line was edited or written without the key")
        records.append(record)
        prev = line_sha(line)
    return LogState(records, prev, _check_anchor(root, len(records), prev, records, key))


def _check_anchor(root: Path, count: int, last: str | None, records: list[dict[str, Any]],
                  key: bytes | None) -> bool:
    """Whether the last record is pending (logged, not yet anchored); raises where the log and its
    anchor disagree."""
    file = root / ANCHOR
    if not file.is_file():  # before the first anchor: the log may hold the first record, pending
        if count == 0 or (count == 1 and records[0]["prev_sha256"] is None):
            return count == 1
        raise AuditError(f"{file} is missing: {root / LOG} cannot be checked for lost lines (the anchor was "
                         "deleted, or the log was written by an older dkvb)")
    try:
        anchor = json.loads(file.read_text())
        anchored, digest = anchor["records"], anchor["last_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AuditError(f"{file}: corrupt anchor ({type(e).__name__}: {e})") from None
    if type(anchored) is not int or anchored < 0:
        raise AuditError(f"{file}: field records must be a count, got {anchored!r}")
    if key is not None:
        mac = anchor.get("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, _anchor_body(anchored, digest))):
            raise AuditError(f"{file}: field mac does not match under the audit key; the anchor was replaced")
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
                     "was replaced, or lines were appended by hand")


def read_log(path: str | os.PathLike, key: bytes | None = None) -> list[dict[str, Any]]:
    """Records of the verified audit log, oldest first (see :func:`load`)."""
    return load(path, key).records


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
    """Whether the store at ``path`` has served requests (it has an audit log or its anchor)."""
    root = Path(path)
    return (root / LOG).is_file() or (root / ANCHOR).is_file()


class AuditLog:
    """The appending side of the log of the store at ``path``; the caller holds the writer lock.

    :meth:`sync` reads and verifies the log (dropping an unfinished last line, anchoring a pending
    record), :meth:`append` adds one record: write, fsync, then replace the anchor.
    """

    def __init__(self, path: str | os.PathLike, key: bytes | None = None) -> None:
        self.root, self.key = Path(path), key
        self.count, self.prev = 0, None

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
        return state.records

    def next_id(self, ahead: int = 0) -> str:
        """The request id of the record after the next ``ahead`` ones."""
        return f"req-{self.count + 1 + ahead:06d}"

    def append(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Append a record (``op`` and ``version_after`` required) with the next id and the time;
        returns it as logged."""
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
        self._anchor()
        return record

    def _anchor(self) -> None:
        anchor: dict[str, Any] = {"records": self.count, "last_sha256": self.prev}
        if self.key is not None:
            anchor["mac"] = _mac(self.key, _anchor_body(self.count, self.prev))
        atomic_write_json(self.root / ANCHOR, anchor)


__all__ = ["AuditLog", "LogState", "load", "read_log", "last_record", "is_served", "audit_key", "encode",
           "line_sha", "LOG", "ANCHOR", "KEY_ENV", "KEY_FILE_ENV"]
