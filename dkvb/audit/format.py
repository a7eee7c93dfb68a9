"""The audit log's format: file names, the key, how a record becomes a chained (and keyed) line."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import AuditError

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



def _marker_body(first: str) -> bytes:
    return f"started|{first}|keyed".encode()


