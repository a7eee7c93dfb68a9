"""The appending side of the audit log: sync, append, anchor, marker and recovery."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..errors import AuditError
from ..io import atomic_write_bytes, atomic_write_json, fsync_dir
from .format import (ANCHOR, KEY_ENV, KEY_FILE_ENV, LOG, MARKER, REJECTED, _anchor_body, _mac, _marker_body, encode,
                     line_sha, now)
from .read import _Bad, _lines, _read_anchor, _verify_lines, load, read_marker

log = logging.getLogger("dkvb")


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


