"""Reading a served model store, and the commit protocol of the requests that write to it.

:class:`ServedStore` reads: the served model (the version the audit log's last record names), the
verified log and replay. :class:`StoreWriter` adds what every request that writes does under the
store's writer lock: verify the log, bring ``HEAD`` in line with it and remove a version left by a
writer killed before logging (:meth:`StoreWriter._sync`), then append the request's record, the
commit point, and move ``HEAD`` (:meth:`StoreWriter._commit`).
The requests themselves live in :mod:`dkvb.service`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from . import store
from .audit import LOG, AuditLog, audit_key, load as load_log, read_marker, served_origin
from .data import EmbeddingSet
from .errors import AuditError, StoreError
from .io import atomic_write_text
from .models import DKVBClassifier
from .replay import ReplayResult, replay_records
from .request import flat_mask, mask_sha
from .store.erase import erase_rows, needs_finishing
from .store.prune import discard_orphan

log = logging.getLogger("dkvb")


class ServedStore:
    """Reading a served model store at ``path``: the served model, the verified log, replay.

    Full versions verified once are kept in memory, so a request loads and verifies only the small
    key-mask file it serves. ``key`` checks (and, for writers, signs) the log's macs (default:
    :func:`dkvb.audit.audit_key` from the environment).
    """

    def __init__(self, path: str | os.PathLike, key: bytes | None = None) -> None:
        self.root = Path(path)
        self.key = key if key is not None else audit_key()
        self._full: dict[str, tuple] = {}  # full version -> (file sha256, tensors, verified digests)

    def load(self, version: str | None = None) -> tuple[DKVBClassifier, dict[str, Any]]:
        """A verified DKVB model of the store (default: the served version, named by the verified
        log) and its manifest.

        Raises ``ValueError`` for another kind of model: the service masks keys.
        """
        model, manifest = store.load_model(self.root, version, cache=self._full)
        if not isinstance(model, DKVBClassifier):
            raise ValueError(f"{self.root}: the service forgets by masking keys of DKVB models; this store holds a "
                             f"{model.config.get('kind')!r} model")
        return model, manifest

    def log(self) -> list[dict[str, Any]]:
        """The verified records (chain, anchor, marker, and macs when the key is set). An empty log
        is also checked against the versions: a store whose versions name requests has lost its
        history, which raises :class:`~dkvb.errors.AuditError`."""
        records = load_log(self.root, self.key).records
        if not records:
            check_history(self.root, records)
        return records

    @staticmethod
    def forgotten_of(manifest: dict[str, Any]) -> list[str]:
        """Classes forgotten through the service in the model a manifest describes."""
        return list(service_extra(manifest).get("forgotten", []))

    def check(self) -> list[dict[str, Any]]:
        """The verified records, after checking that every version a request wrote is in the log
        (so a log deleted or cut together with its anchor is detected too), that every logged
        model digest is the stored version's, and that the served version loads with the class
        names its origin record logged. Raises :class:`~dkvb.errors.AuditError` naming what
        disagrees."""
        records = self.log()
        check_history(self.root, records)
        check_logged_models(self.root, records)
        if records:
            _, manifest = self.load(records[-1]["version_after"])
            check_origin_names(self.root, manifest, records)
            head = store.current_version(self.root)
            if head != records[-1]["version_after"]:
                log.warning("%s: HEAD is %s, the log serves %s (a killed writer or an edit); the next request moves "
                            "HEAD", self.root, repr(head) if head is not None else "missing",
                            records[-1]["version_after"])
        return records

    def replay(self, data: EmbeddingSet | None = None) -> ReplayResult:
        """Recompute every logged request from the origin model (:mod:`dkvb.replay`) after
        :meth:`check`. Raises :class:`~dkvb.replay.ReplayError` where a replayed mask differs from
        the logged one, and :class:`~dkvb.errors.AuditError` for an empty, cut or edited log."""
        return replay_records(self.check(), self.load, data, str(self.root / LOG))


class StoreWriter(ServedStore):
    """The commit protocol shared by every request that writes to the store at ``path``.

    Writers take the store's lock for the whole request, so a second concurrent writer fails at
    once with :class:`~dkvb.store.StoreLockedError`.
    """

    def __init__(self, path: str | os.PathLike, key: bytes | None = None) -> None:
        super().__init__(path, key)
        self._log = AuditLog(self.root, self.key)
        self._origin: dict[str, Any] | None = None  # an origin record to write before the next one
        self._served: str | None = None  # the version served when the lock was taken (set by _sync)
        self.warning: str | None = None  # what the last committed request could not complete

    def _require_store(self) -> None:
        """Refuse to write to a folder that is not a model store (so a typo creates nothing)."""
        if store.current_version(self.root) is None and not store.list_versions(self.root):
            raise StoreError(f"no stored model at {self.root} (HEAD is missing)")

    def _commit(self, record: dict[str, Any], version: str) -> dict[str, Any]:
        """Append the pending origin record (if any) and ``record`` (the commit point), then point
        ``HEAD`` at ``version``. Once ``record`` is logged the request is committed and served:
        failing to replace the anchor or ``HEAD`` then (a full disk, a permission) is a warning
        (kept in :attr:`warning`), and the next writer completes it."""
        self.warning = None
        if self._origin is not None:
            origin, self._origin = self._origin, None
            self._log.append(origin)
        self._log.unanchored = None
        logged = self._log.append(record, final=True)
        problem = self._log.unanchored
        try:
            if store.current_version(self.root) != version:
                atomic_write_text(self.root / "HEAD", version + "\n")
        except OSError as e:
            problem = problem or e
            log.warning("%s: %s is committed and served, but HEAD could not be moved (%s); the next request "
                        "moves it", self.root, logged["request_id"], e)
        if problem is not None:
            self.warning = (f"{logged['request_id']} is committed and served, but the store could not be brought "
                            f"fully in line ({problem}); the next request completes it")
        return logged

    def _save(self, after: DKVBClassifier, before: DKVBClassifier, manifest: dict[str, Any],
              record: dict[str, Any], base: str | None = None) -> str:
        """Write the model after a request as a new version sharing all but the changed tensors
        with ``base`` (default: the served version), whose manifest names the request; completes
        ``record``."""
        head, delta = base or self._served, after.key_mask & ~before.key_mask
        extra = {k: v for k, v in (manifest.get("extra") or {}).items() if k != "fingerprint"}
        extra["service"] = {"request_id": self._log.next_id(ahead=self._origin is not None),
                            "forgotten": record["forgotten"]}
        full = manifest.get("shared", {}).get("version", head)
        version = store.save_model(after, self.root, class_names=list(manifest["class_names"]),
                                   encoder=manifest["encoder"], encoder_config=manifest.get("encoder_config"),
                                   extra=extra, base=head, base_tensors=self._full.get(full, (None, None))[1],
                                   update_head=False)
        record.update(noop=False, keys_masked=int(delta.sum()), keys_masked_total=int(after.key_mask.sum()),
                      mask_delta=flat_mask(delta), mask_sha256=mask_sha(after.key_mask), version_after=version,
                      model_sha256_after=store.read_manifest(self.root, version)["model_sha256"])
        return version

    def _sync(self) -> list[dict[str, Any]]:
        """Verify the log and bring ``HEAD`` in line with it (writer lock held); returns the records.

        The served version is the last record's: ``HEAD`` is moved there when a writer died before
        moving it, or when it is missing, corrupt or was edited. The served version's manifest must
        name a logged request (a cut log is refused). An orphan (the newest version, written by a
        request killed before logging, :func:`find_orphan`) is removed, so the id it names goes to
        this request alone. Without a log, the served model gets an origin record, written by
        :meth:`_commit` just before the request's own.
        """
        self._origin = None
        records = self._log.sync()
        finish_erasure(self.root, records)
        served = records[-1]["version_after"] if records else store.current_version(self.root)
        if served is None:
            raise StoreError(f"{self.root}: HEAD is missing; not a dkvb model store")
        self._served = served
        check_version_logged(self.root, served, records)
        check_history(self.root, records)
        check_logged_models(self.root, records)
        if records and store.current_version(self.root) != served:
            log.warning("%s: HEAD is not the version the audit log serves (%s): a killed writer or an edit; "
                        "moving HEAD", self.root, served)
            atomic_write_text(self.root / "HEAD", served + "\n")
        orphan = find_orphan(self.root, records)
        if orphan is not None:
            log.warning("%s: removing version %s, written by a request killed before it was logged (%s); the "
                        "request ids that follow are the log's own", self.root, orphan,
                        service_extra(store.read_manifest(self.root, orphan)).get("request_id"))
            discard_orphan(self.root, orphan)
            self._full.pop(orphan, None)
        if records:
            check_origin_names(self.root, store.read_manifest(self.root, served), records)
            return records
        model, manifest = self.load(served)
        self._origin = {"op": "origin", "version": served, "note": "the model requests start from",
                        "model_sha256": manifest.get("model_sha256") or store.model_sha256(model),
                        "mask_sha256": mask_sha(model.key_mask), "forgotten": self.forgotten_of(manifest),
                        "class_names": list(manifest["class_names"]), "version_after": served}
        return [{"request_id": self._log.next_id(), **self._origin}]


def service_extra(manifest: dict[str, Any]) -> dict[str, Any]:
    extra = manifest.get("extra")
    service = extra.get("service") if isinstance(extra, dict) else None
    return service if isinstance(service, dict) else {}


def check_history(root: Path, records: list[dict[str, Any]]) -> None:
    """Every version a request wrote must be in the log (:func:`check_version_logged`), so a log
    deleted or cut together with its anchor is refused while such a version exists, whichever
    version is served; and a store with the marker of a served store must have records."""
    if not records and read_marker(root) is not None:
        raise AuditError(f"{root / LOG} is empty or missing, but the store has served requests "
                         f"({root.name}/audit.started.json): its history was deleted")
    versions = store.list_versions(root)
    for version in versions:
        check_version_logged(root, version, records, orphan_ok=version == versions[-1])


def check_logged_models(root: Path, records: list[dict[str, Any]]) -> None:
    """Every logged model digest (an origin's ``model_sha256``, a record's ``model_sha256_after``)
    must be the ``model_sha256`` of its version where that version still exists (a loaded
    version's tensors are checked against its manifest, :mod:`dkvb.store.read`)."""
    existing = set(store.list_versions(root))
    rewritten = {v: d for r in records if r["op"] == "prune" for v, d in (r.get("rewritten") or {}).items()}
    for r in records:
        pairs = [("version_after", "model_sha256_after")]
        if r["op"] == "origin":
            pairs.insert(0, ("version", "model_sha256"))
            if "model_sha256_after" not in r:
                pairs[1] = ("version_after", "model_sha256")
        for vfield, sfield in pairs:
            version, logged = r.get(vfield), r.get(sfield)
            if version not in existing or not logged:
                continue
            if version in rewritten:  # an erasing prune rewrote it since: its record holds the digest
                logged, sfield = rewritten[version], "(prune) rewritten"
            stored = store.read_manifest(root, version).get("model_sha256")
            if stored is not None and stored != logged:
                raise AuditError(f"{root / LOG}: {r['request_id']} logged {sfield} {logged[:12]}..., but version "
                                 f"{version} holds model {stored[:12]}...: the version was rewritten")


def finish_erasure(root: Path, records: list[dict[str, Any]]) -> None:
    """Complete the rewrites of a logged erasing prune that was killed half-way (writer lock held):
    every version it names ends with the logged model digest, the versions sharing its tensors
    with its file digest."""
    rows: dict[str, set[int]] = {}
    digests: dict[str, str] = {}
    for r in records:
        if r["op"] == "prune" and r.get("erased_in"):
            for version in r["erased_in"]:
                rows.setdefault(version, set()).update(r.get("erased_rows", []))
            digests.update(r.get("rewritten") or {})
    for version in needs_finishing(root, rows, digests) if rows else []:
        log.warning("%s: completing the erasure of version %s that a killed prune left half-written", root, version)
        erase_rows(root, version, sorted(rows[version]))


def check_origin_names(root: Path, manifest: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """The served version's class names must be those its origin record logged."""
    origin = served_origin(records)
    if origin is not None:
        vdir = root / "versions" / str(records[-1]["version_after"])
        store.check_class_names(manifest, origin, vdir)


def find_orphan(root: Path, records: list[dict[str, Any]]) -> str | None:
    """The newest version when a request wrote it that the log does not hold: an orphan left by a
    writer killed before logging (:func:`check_history` says whether it may be one), else ``None``."""
    versions = store.list_versions(root)
    if not versions:
        return None
    rid = service_extra(store.read_manifest(root, versions[-1])).get("request_id")
    if rid is None or any(r["request_id"] == rid for r in records):
        return None
    return versions[-1]


def check_version_logged(root: Path, version: str, records: list[dict[str, Any]], orphan_ok: bool = False) -> None:
    """A version a request wrote names that request: the log must hold it, with this version.

    A writer killed before logging leaves an orphan: the newest version (``orphan_ok``) with the
    request id the next request gets (``len(records) + 1``, or 2 for the first request, which
    logs an origin record first). Readers accept it; the next writer removes it
    (:meth:`StoreWriter._sync`) before it logs a record with that id, whatever the request (a
    restore, prune or recover writes no version of its own to tell the two apart). Also accepted: a
    version whose id the log holds with a newer version (a retry that logged it).
    """
    rid = service_extra(store.read_manifest(root, version)).get("request_id")
    if rid is None:
        return
    rec = next((r for r in records if r["request_id"] == rid), None)
    if rec is None and orphan_ok and _request_number(rid) in (len(records) + 1, 2 if not records else -1):
        return
    if rec is not None and rec["version_after"] > version:
        return
    if rec is None or rec["version_after"] != version:
        raise AuditError(f"{root / LOG}: version {version} was written by request {rid}, which the log "
                         + ("lacks: the log was cut, emptied or deleted" if rec is None else
                            f"names with version {rec['version_after']}: the log was replaced"))


def _request_number(rid: Any) -> int:
    try:
        return int(str(rid).removeprefix("req-"))
    except ValueError:
        return 0


def logged_sha(record: dict[str, Any]) -> str | None:
    return record.get("model_sha256_after") or record.get("model_sha256")


def find_record(records: list[dict[str, Any]], to: str) -> dict[str, Any]:
    if to == "origin":
        return next(r for r in records if r["op"] == "origin")
    for r in records:
        if r["request_id"] == to:
            return r
    raise ValueError(f"unknown request id {to!r}; known: {[r['request_id'] for r in records][-10:]} (last 10) "
                     "or 'origin'")
