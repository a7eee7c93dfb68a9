"""Unlearning as a service: forget, restore and prune requests against a stored model, each logged.

A request is applied to the model the store serves and commits a new version (for the masking
unlearners only the key mask is written; every other tensor is shared with the full version it
rests on, see :mod:`dkvb.store`). Every request appends one record to the store's audit log
(:mod:`dkvb.audit`: format, hash chain, anchor, optional key)::

    {"request_id": "req-000002", "op": "forget", "time": "...", "classes": ["cat"], "method": "dkvb-activations",
     "params": {...}, "keys_masked": 37, "mask_delta": [...], "mask_sha256": "...", "forgotten": ["cat"],
     "model_sha256_before": "...", "model_sha256_after": "...", "version_before": "000001",
     "version_after": "000002", "metrics": {...}, "prev_sha256": "..."}

Record kinds (``op``): ``origin`` (the model requests start from: written before the first
request, or by ``save_model(force=True)`` when a new model replaces a served one), ``forget``,
``restore`` and ``prune``.

Commit order (under the store's writer lock): write the new version (its manifest names the request
id, anchoring the log in the version), append the record (the commit point), replace the log's
anchor, move ``HEAD``. A writer killed before the append leaves an unreferenced version (the
request did not happen); one killed after it leaves ``HEAD`` behind, but readers serve the
version the log names (:func:`dkvb.store.served_version`) and the next writer moves ``HEAD``.

Replay (:func:`replay`, :mod:`dkvb.replay`) starts from the origin model and recomputes every
request, comparing each step's key mask bit for bit with the logged digest.

The log never holds embeddings, only digests of them, so it does not retain forgotten data; the
model's earlier versions do hold the forgotten classes' values (masking hides them, see
:mod:`dkvb.verify`) until ``dkvb prune`` deletes the versions nothing needs any more.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from . import store
from .audit import LOG, AuditLog, audit_key, is_served, load as load_log
from .data import EmbeddingSet, resolve_classes
from .errors import AuditError, StoreError
from .io import atomic_write_text
from .models import DKVBClassifier
from .replay import ReplayError, ReplayResult, replay_records
from .request import METHODS, check_data, flat_mask, make_request, mask_sha, method_name, metrics as request_metrics
from .unlearn import create_unlearner

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
        self._full: dict[str, tuple[str, dict[str, Tensor]]] = {}

    def load(self, version: str | None = None) -> tuple[DKVBClassifier, dict[str, Any]]:
        """A verified DKVB model of the store (default: the served version) and its manifest.

        Raises ``ValueError`` for another kind of model: the service masks keys.
        """
        model, manifest = store.load_model(self.root, version, cache=self._full)
        if not isinstance(model, DKVBClassifier):
            raise ValueError(f"{self.root}: the service forgets by masking keys of DKVB models; this store holds a "
                             f"{model.config.get('kind')!r} model")
        return model, manifest

    def log(self) -> list[dict[str, Any]]:
        """The verified records (chain, anchor, and macs when the key is set)."""
        return load_log(self.root, self.key).records

    @staticmethod
    def forgotten_of(manifest: dict[str, Any]) -> list[str]:
        """Classes forgotten through the service in the model a manifest describes."""
        return list(_service_extra(manifest).get("forgotten", []))

    def check(self) -> list[dict[str, Any]]:
        """The verified records, after checking that every version a request wrote is in the log
        (so a log deleted or cut together with its anchor is detected too) and that the served
        version loads. Raises :class:`~dkvb.errors.AuditError` naming what disagrees."""
        records = self.log()
        versions = store.list_versions(self.root)
        for version in versions:
            _check_version_logged(self.root, version, records, orphan_ok=version == versions[-1])
        if records:
            self.load(records[-1]["version_after"])
        return records

    def replay(self, data: EmbeddingSet | None = None) -> ReplayResult:
        """Recompute every logged request from the origin model (:mod:`dkvb.replay`) after
        :meth:`check`. Raises :class:`~dkvb.replay.ReplayError` where a replayed mask differs from
        the logged one, and :class:`~dkvb.errors.AuditError` for an empty, cut or edited log."""
        return replay_records(self.check(), self.load, data, str(self.root / LOG))


class ModelService(ServedStore):
    """Forget/restore/prune requests against the model store at ``path``, each appended to its log.

    Writers take the store's lock for the whole request, so a second concurrent writer fails at
    once with :class:`~dkvb.store.StoreLockedError`.
    """

    def __init__(self, path: str | os.PathLike, key: bytes | None = None) -> None:
        super().__init__(path, key)
        self._log = AuditLog(self.root, self.key)
        self._origin: dict[str, Any] | None = None  # an origin record to write before the next one
        self._served: str | None = None  # the version served when the lock was taken (set by _sync)

    def forget(self, classes: Sequence[int | str] | str, method: str = "activations",
               params: dict[str, Any] | None = None, *, data: EmbeddingSet | None = None,
               test: EmbeddingSet | None = None, seed: int = 0, metrics: bool = True) -> dict[str, Any]:
        """Forget ``classes`` (strings are names, ints indices: :func:`dkvb.data.resolve_classes`)
        from the served model with ``method`` (``activations``/``examples``) and its ``params``;
        returns the logged record.

        ``data`` (training embeddings) is needed by ``examples``, and by ``activations`` when the
        model has no cached counts; with it the record gets accuracies after the request on all
        forgotten classes (``test`` adds test metrics; ``metrics=False`` skips them). ``seed``
        seeds the draw of forget examples. Classes already forgotten are skipped with a notice (a
        request naming only forgotten classes is a logged no-op and writes no version).

        Raises ``ValueError`` for unknown classes or methods, a request that would forget every
        class or mask a whole codebook, or missing/mismatched embeddings;
        :class:`~dkvb.store.StoreLockedError` while another writer is active;
        :class:`~dkvb.errors.AuditError` for a damaged log.
        """
        unlearner = create_unlearner(method_name(method), **(params or {}))
        self._require_store()
        with store.writer_lock(self.root):
            self._sync()
            head = self._served
            model, manifest = self.load(head)
            names = list(manifest["class_names"])
            ids = resolve_classes(classes, names)
            for what, given in (("data", data), ("test", test)):
                check_data(given, model, names, what)
            done = self.forgotten_of(manifest)
            new = [i for i in ids if names[i] not in done]
            record: dict[str, Any] = {
                "op": "forget", "classes": [names[i] for i in ids], "new_classes": [names[i] for i in new],
                "already_forgotten": [names[i] for i in ids if names[i] in done], "method": unlearner.name,
                "params": unlearner.params, "seed": seed, "version_before": head,
                "model_sha256_before": manifest.get("model_sha256") or store.model_sha256(model),
            }
            if record["already_forgotten"]:
                log.info("already forgotten, nothing to do for: %s", ", ".join(record["already_forgotten"]))
            if not new:
                record.update(noop=True, keys_masked=0, keys_masked_total=int(model.key_mask.sum()), mask_delta=[],
                              mask_sha256=mask_sha(model.key_mask), forgotten=done,
                              model_sha256_after=record["model_sha256_before"], version_after=head)
                return self._commit(record, head)
            if len(done) + len(new) >= len(names):
                raise ValueError(f"cannot forget every class ({len(done) + len(new)} of {len(names)}): "
                                 "nothing would be retained")
            request, digest = make_request(unlearner, model, new, data, seed, [names.index(c) for c in done])
            start = time.perf_counter()
            report = unlearner.unlearn(model, request)
            record.update(seconds=time.perf_counter() - start, flops=report.flops, data_sha256=digest,
                          forgotten=done + [names[i] for i in new])
            version = self._save(report.model, model, manifest, record)
            if data is not None and metrics:
                record["metrics"] = request_metrics(report.model, data, test,
                                                    [names.index(c) for c in record["forgotten"]])
            return self._commit(record, version)

    def restore(self, to: str) -> dict[str, Any]:
        """Serve the model right after request ``to`` again (a request id, or ``origin`` for the
        model the first request started from); logged like a request. Works with ``HEAD``
        missing or corrupt: the log names what is served."""
        self._require_store()
        with store.writer_lock(self.root):
            records = self._sync()
            target = _find(records, to)
            head, version = self._served, target["version_after"]
            if version not in store.list_versions(self.root):
                raise ValueError(f"cannot restore {target['request_id']}: its version {version} was deleted (see "
                                 "`dkvb log` for a prune)")
            after, manifest = self.load(version)
            if version == head:
                log.info("the model after %s is already served; nothing to restore", target["request_id"])
            return self._commit({
                "op": "restore", "to": target["request_id"], "noop": version == head,
                "mask_sha256": mask_sha(after.key_mask), "forgotten": self.forgotten_of(manifest),
                "model_sha256_before": _logged_sha(records[-1]),
                "model_sha256_after": manifest.get("model_sha256") or store.model_sha256(after),
                "version_before": head, "version_after": version,
            }, version)

    def prune(self, *, dry_run: bool = False) -> list[str]:
        """Delete the versions neither the served model nor replay (the origin models) needs, never
        a base the kept ones share tensors with; logged when the store is served. Returns the
        deleted (``dry_run``: deletable) versions; restoring to them is refused afterwards."""
        self._require_store()
        with store.writer_lock(self.root):
            records = self._sync() if is_served(self.root) else []
            keep = {r["version"] for r in records if r["op"] == "origin"}
            removed = store.prune(self.root, keep, dry_run=dry_run)
            if removed and records and not dry_run:
                self._commit({"op": "prune", "noop": False, "removed": removed,
                              "mask_sha256": records[-1]["mask_sha256"], "forgotten": records[-1].get("forgotten", []),
                              "version_before": self._served, "version_after": self._served}, self._served)
        return removed

    # -------------------------------------------------------------- commit plumbing
    def _require_store(self) -> None:
        """Refuse to write to a folder that is not a model store (so a typo creates nothing)."""
        if store.served_version(self.root) is None:
            raise StoreError(f"no stored model at {self.root} (HEAD is missing)")

    def _save(self, after: DKVBClassifier, before: DKVBClassifier, manifest: dict[str, Any],
              record: dict[str, Any]) -> str:
        """Write the model after a forget request as a new version (sharing all but the changed
        tensors) whose manifest names the request; completes ``record``."""
        head, delta = self._served, after.key_mask & ~before.key_mask
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

    def _commit(self, record: dict[str, Any], version: str) -> dict[str, Any]:
        """Append the pending origin record (if any) and ``record`` (the commit point), then point
        ``HEAD`` at ``version``."""
        if self._origin is not None:
            origin, self._origin = self._origin, None
            self._log.append(origin)
        logged = self._log.append(record)
        if store.current_version(self.root) != version:
            atomic_write_text(self.root / "HEAD", version + "\n")
        return logged

    def _sync(self) -> list[dict[str, Any]]:
        """Verify the log and bring ``HEAD`` in line with it (writer lock held); returns the records.

        The served version is the last record's: ``HEAD`` is moved there when a writer died before
        moving it, or when it is missing, corrupt or was edited. The served version's manifest must
        name a logged request (a cut log is refused). Without a log, the served model gets an
        origin record, written by :meth:`_commit` just before the request's own.
        """
        self._origin = None
        records = self._log.sync()
        served = records[-1]["version_after"] if records else store.current_version(self.root)
        if served is None:
            raise StoreError(f"{self.root}: HEAD is missing; not a dkvb model store")
        self._served = served
        _check_version_logged(self.root, served, records)
        if records and store.current_version(self.root) != served:
            log.warning("%s: HEAD is not the version the audit log serves (%s): a killed writer or an edit; "
                        "moving HEAD", self.root, served)
            atomic_write_text(self.root / "HEAD", served + "\n")
        if records:
            return records
        model, manifest = self.load(served)
        self._origin = {"op": "origin", "version": served, "note": "the model requests start from",
                        "model_sha256": manifest.get("model_sha256") or store.model_sha256(model),
                        "mask_sha256": mask_sha(model.key_mask), "forgotten": self.forgotten_of(manifest),
                        "version_after": served}
        return [{"request_id": self._log.next_id(), **self._origin}]


# ------------------------------------------------------------------ helpers
def _service_extra(manifest: dict[str, Any]) -> dict[str, Any]:
    extra = manifest.get("extra")
    service = extra.get("service") if isinstance(extra, dict) else None
    return service if isinstance(service, dict) else {}


def _check_version_logged(root: Path, version: str, records: list[dict[str, Any]], orphan_ok: bool = False) -> None:
    """A version a request wrote names that request: the log must hold it, with this version.

    A writer killed before logging leaves an orphan: the newest version (``orphan_ok``) with a
    request id past the log, or one whose id a later retry logged with a newer version.
    """
    rid = _service_extra(store.read_manifest(root, version)).get("request_id")
    if rid is None:
        return
    rec = next((r for r in records if r["request_id"] == rid), None)
    if (rec is None and orphan_ok) or (rec is not None and rec["version_after"] > version):
        return
    if rec is None or rec["version_after"] != version:
        raise AuditError(f"{root / LOG}: version {version} was written by request {rid}, which the log "
                         + ("lacks: the log was cut, emptied or deleted" if rec is None else
                            f"names with version {rec['version_after']}: the log was replaced"))


def _logged_sha(record: dict[str, Any]) -> str | None:
    return record.get("model_sha256_after") or record.get("model_sha256")


def _find(records: list[dict[str, Any]], to: str) -> dict[str, Any]:
    if to == "origin":
        return next(r for r in records if r["op"] == "origin")
    for r in records:
        if r["request_id"] == to:
            return r
    raise ValueError(f"unknown request id {to!r}; known: {[r['request_id'] for r in records][-10:]} (last 10) "
                     "or 'origin'")


# ------------------------------------------------------------------ functions
def forget(path: str | os.PathLike, classes: Sequence[int | str] | str, method: str = "activations",
           params: dict[str, Any] | None = None, *, data: EmbeddingSet | None = None,
           test: EmbeddingSet | None = None, seed: int = 0, metrics: bool = True) -> dict[str, Any]:
    """:meth:`ModelService.forget` on the store at ``path``."""
    return ModelService(path).forget(classes, method, params, data=data, test=test, seed=seed, metrics=metrics)


def restore(path: str | os.PathLike, request_id: str) -> dict[str, Any]:
    """:meth:`ModelService.restore` on the store at ``path``."""
    return ModelService(path).restore(request_id)


def replay(path: str | os.PathLike, data: EmbeddingSet | None = None) -> Tensor:
    """The key mask replayed from the audit log; raises :class:`ReplayError` unless it equals the
    served model's bit for bit (and every step its logged digest)."""
    result = ModelService(path).replay(data)
    if not result.matches_head:
        raise ReplayError(f"{path}: the replayed key mask differs from the served model's (HEAD)")
    return result.mask


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The verified records of the store's audit log (macs checked when the key is set)."""
    return load_log(path, audit_key()).records


__all__ = [
    "ServedStore", "ModelService", "ReplayResult", "ReplayError", "forget", "restore", "replay", "read_log",
    "method_name", "METHODS", "LOG",
]
