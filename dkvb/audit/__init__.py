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
from .format import ANCHOR, KEY_ENV, KEY_FILE_ENV, LOG, MARKER, REJECTED, audit_key, encode, line_sha, now
from .log import AuditLog
from .read import LogState, is_served, last_record, load, read_log, read_marker, served_origin, served_state

__all__ = ["AuditLog", "LogState", "load", "read_log", "last_record", "is_served", "audit_key", "encode",
           "line_sha", "now", "read_marker", "served_origin", "served_state", "LOG", "ANCHOR", "MARKER", "REJECTED",
           "KEY_ENV", "KEY_FILE_ENV"]
