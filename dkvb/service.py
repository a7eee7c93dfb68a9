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
request, or by ``save_model(force=True)`` when a new model replaces a served one; it holds the
model's class names), ``forget``, ``restore``, ``prune`` and ``recover`` (a tail that did not
verify was moved aside, :meth:`ModelService.recover`).

Commit order (under the store's writer lock): write the new version (its manifest names the request
id, anchoring the log in the version), append the record (the commit point), replace the log's
anchor, move ``HEAD``. A writer killed before the append leaves an unreferenced version (the
request did not happen); one killed after it leaves ``HEAD`` behind, but readers serve the
version the log names (:func:`dkvb.store.served_version`) and the next writer moves ``HEAD``.

Replay (:func:`replay`, :mod:`dkvb.replay`) starts from the origin model and recomputes every
request, comparing each step's key mask bit for bit with the logged digest.

The log never holds embeddings, only digests of them, so it does not retain forgotten data; the
model's earlier versions do hold the forgotten classes' values (masking hides them, see
:mod:`dkvb.verify`) until ``dkvb prune`` deletes the versions nothing needs any more and, for
``erase_values`` requests, zeroes those values in the versions it keeps (:mod:`dkvb.store.erase`).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

from torch import Tensor

from . import store
from .audit import LOG, REJECTED, is_served, line_sha
from .data import EmbeddingSet, resolve_classes
from .models import DKVBClassifier
from .replay import ReplayError, ReplayResult
from .request import METHODS, check_data, flat_mask, make_request, mask_sha, method_name, metrics as request_metrics
from .served import ServedStore, StoreWriter, check_history, find_record, logged_sha
from .store.erase import erase_rows, erasure_plan, holding
from .unlearn import create_unlearner

log = logging.getLogger("dkvb")


class ModelService(StoreWriter):
    """Forget/restore/prune requests against the model store at ``path``, and replacing its model
    by a retrained one; each appended to its log.

    Writers take the store's lock for the whole request, so a second concurrent writer fails at
    once with :class:`~dkvb.store.StoreLockedError`.

    The service keeps, in memory only, the training embeddings' selected keys of the last
    version it wrote (:class:`~dkvb.classifier.CodeCache`), so a run of re-fitting requests
    searches only what each mask moved; a version name is never reused, so a cache can only
    match the model it was made for.
    """

    _codes: tuple[str, Any] | None = None
    erased_kept: dict[str, int] = {}  # after prune: kept versions still holding erased values
    erased_now: dict[str, int] = {}  # after prune: versions whose erased values it zeroed (dry run: would)

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
            if self._codes is not None and self._codes[0] == head:  # this process made the served version
                model.code_cache = self._codes[1]
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
            # the parameters as used: a default resolved against the model (the share rule's
            # min_share) is logged as its value, so replay does not depend on later defaults
            record.update(params=report.params, seconds=time.perf_counter() - start, flops=report.flops, data_sha256=digest,
                          forgotten=done + [names[i] for i in new])
            if getattr(unlearner, "erase_values", False):
                record["note"] = ("values of the masked keys zeroed in this version; earlier versions, the origin "
                                  "replay starts from included, hold them until dkvb prune erases them")
            version = self._save(report.model, model, manifest, record)
            self._codes = (version, report.model.code_cache)
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
            target = find_record(records, to)
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
                "model_sha256_before": logged_sha(records[-1]),
                "model_sha256_after": manifest.get("model_sha256") or store.model_sha256(after),
                "version_before": head, "version_after": version,
            }, version)

    def prune(self, *, dry_run: bool = False) -> list[str]:
        """Delete the versions neither the served model nor replay (the origin models) needs, never
        a base the kept ones share tensors with, and erase from the kept ones the values that the
        ``erase_values`` requests in effect zeroed; logged when the store is served. Returns the
        deleted (``dry_run``: deletable) versions; restoring to them is refused afterwards.

        The prune record is written before anything changes: ``removed``, and for an erasure
        ``erased_rows`` (flat key indices), ``erased_in`` (``{version: keys}``) and ``rewritten``
        (the new model digest of every version whose model changed: replay and verify expect it).
        Kept versions are rewritten in place (:func:`dkvb.store.erase.erase_rows`); the served one
        never changes. :attr:`erased_now` says which versions were rewritten (``dry_run``: would
        be), :attr:`erased_kept` which kept versions still hold erased values."""
        self._require_store()
        with store.writer_lock(self.root):
            if is_served(self.root):
                records = self._sync()
            else:
                records = []
                check_history(self.root, records)  # versions a request wrote, but no log: refused
            keep = {r["version"] for r in records if r["op"] == "origin"}
            doomed = store.prune(self.root, keep, dry_run=True)
            kept = [v for v in store.list_versions(self.root) if v not in doomed]
            rows = _erased_in_effect(records)
            plan = erasure_plan(self.root, [v for v in kept if v != self._served], rows) if rows else {
                "erased_in": {}, "model_sha256": {}}
            self.erased_now = plan["erased_in"]
            if dry_run:
                self.erased_kept = plan["erased_in"]
                return doomed
            if records and (doomed or plan["erased_in"]):
                erasure = ({"erased_rows": rows, "erased_in": plan["erased_in"], "rewritten": plan["model_sha256"]}
                           if plan["erased_in"] else {})
                self._commit({"op": "prune", "noop": False, "removed": doomed,
                              "mask_sha256": records[-1]["mask_sha256"], "forgotten": records[-1].get("forgotten", []),
                              **erasure, "version_before": self._served, "version_after": self._served},
                             self._served)
            for version in plan["erased_in"]:
                erase_rows(self.root, version, rows)
            removed = store.prune(self.root, keep)
            kept = [v for v in store.list_versions(self.root) if v != self._served]
            self.erased_kept = _erased_values_kept(self.root, rows, kept)
            return removed

    def recover(self) -> dict[str, Any] | None:
        """Serve the last verified record again: move the log's lines past its anchored records
        that do not verify (a forged tail, lines written without the key) to
        ``audit.rejected.jsonl`` and log a ``recover`` record naming them; returns it (``None``
        when the whole log verifies). Raises :class:`~dkvb.errors.AuditError` where the damage
        lies inside the anchored history, and for a keyed log without the key."""
        self._require_store()
        with store.writer_lock(self.root):
            dropped = self._log.recover()
            records = self._sync()
            if not dropped:
                return None
            last = records[-1]
            return self._commit({
                "op": "recover", "noop": False, "dropped": len(dropped),
                "dropped_sha256": [line_sha(line) for line in dropped], "rejected_file": REJECTED,
                "note": f"dropped {len(dropped)} line(s) that did not verify (kept in {REJECTED})",
                "mask_sha256": last.get("mask_sha256"), "forgotten": last.get("forgotten", []),
                "model_sha256_after": logged_sha(last), "version_before": self._served,
                "version_after": self._served}, self._served)

    def replace(self, model: DKVBClassifier, *, class_names: list[str], encoder: str,
                encoder_config: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                data: EmbeddingSet | None = None) -> dict[str, Any]:
        """Serve a retrained ``model`` instead of the current one, with every forget request in
        effect re-applied to it (same method, parameters and seed), so the served model still
        forgets what the log says is forgotten; returns the logged ``origin`` record.

        The record's ``version`` is the new model as trained (replay and verify start from it),
        ``version_after`` the model served after re-applying, ``reapplied`` one entry per request
        re-applied (its id, classes, method, parameters, seed, mask delta). ``data`` (training
        embeddings) is needed where a re-applied method reads embeddings. Nothing is written to
        the log or ``HEAD`` unless every request re-applies.

        Raises ``ValueError`` where the new model lacks a forgotten class or a method needs
        ``data`` it was not given.
        """
        self._require_store()
        with store.writer_lock(self.root):
            records = self._sync()
            steps = _steps_in_effect(records)
            forgotten = [c for s in steps for c in s["new_classes"]]
            missing = [c for c in forgotten if c not in class_names]
            if missing:
                raise ValueError(f"{self.root}: the new model lacks the forgotten class(es) {missing}; the logged "
                                 "forget requests cannot be re-applied to it")
            check_data(data, model, list(class_names), "data")
            version = store.save_model(model, self.root, class_names=list(class_names), encoder=encoder,
                                       encoder_config=encoder_config, extra=extra, update_head=False)
            trained, manifest = self.load(version)
            current, reapplied = _reapply(steps, trained, list(class_names), data)
            record: dict[str, Any] = {
                "op": "origin", "version": version, "version_before": self._served,
                "class_names": list(class_names),
                "note": "model replaced by a retrained one; the forget requests in effect re-applied to it",
                "model_sha256": manifest["model_sha256"], "reapplied": reapplied, "forgotten": forgotten,
                "mask_sha256": mask_sha(current.key_mask), "model_sha256_before": logged_sha(records[-1]),
            }
            final = self._save(current, trained, manifest, dict(record), base=version) if reapplied else version
            record.update(version_after=final, model_sha256_after=store.read_manifest(self.root, final)["model_sha256"])
            return self._commit(record, final)


def _erased_in_effect(records: list[dict[str, Any]]) -> list[int]:
    """The flat key indices whose values the ``erase_values`` requests in effect for the served
    model zeroed (followed through restores and replacements)."""
    state: dict[str, set[int]] = {}
    current: set[int] = set()
    for r in records:
        if r["op"] == "origin":
            current = {i for s in r.get("reapplied", []) if (s.get("params") or {}).get("erase_values")
                       for i in s.get("mask_delta", [])}
        elif r["op"] == "restore":
            current = set(state.get(r["to"], set()))
        elif r["op"] == "forget" and not r.get("noop") and (r.get("params") or {}).get("erase_values"):
            current = current | set(r.get("mask_delta", []))
        state[r["request_id"]] = current
    return sorted(current)


def _erased_values_kept(root: Any, rows: list[int], versions: list[str]) -> dict[str, int]:
    """``{version: N}`` for ``versions`` whose own values are non-zero at N of ``rows``."""
    out: dict[str, int] = {}
    for version in versions if rows else []:
        held = holding(store.load_tensors(root, version, shared=False)[0].get("bottleneck.values"), rows)
        if held:
            out[version] = held
    return out


def _reapply(steps: list[dict[str, Any]], model: DKVBClassifier, names: list[str],
             data: EmbeddingSet | None) -> tuple[DKVBClassifier, list[dict[str, Any]]]:
    """``model`` with the forget ``steps`` applied in order (each with its logged method, parameters
    and seed), and the steps completed with their mask deltas and the digests of what they read."""
    reapplied, done = [], []
    for step in steps:
        unlearner = create_unlearner(step["method"], **step["params"])
        ids = [names.index(c) for c in step["new_classes"]]
        request, digest = make_request(unlearner, model, ids, data, step["seed"], done)
        after = unlearner.unlearn(model, request).model
        reapplied.append({**step, "mask_delta": flat_mask(after.key_mask & ~model.key_mask), "data_sha256": digest})
        model, done = after, done + ids
    return model, reapplied


def _steps_in_effect(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The forget requests the served model carries, oldest first (what :meth:`ModelService.replace`
    re-applies): followed through restores and earlier replacements."""
    steps: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] = []
    for r in records:
        if r["op"] == "origin":
            current = [{k: s[k] for k in ("request_id", "new_classes", "method", "params", "seed")}
                       for s in r.get("reapplied", [])]
        elif r["op"] == "restore":
            current = steps[r["to"]]
        elif r["op"] == "forget" and not r.get("noop"):
            current = current + [{"request_id": r["request_id"], "new_classes": r["new_classes"],
                                  "method": r["method"], "params": r["params"], "seed": r.get("seed", 0)}]
        steps[r["request_id"]] = current
    return current


# ------------------------------------------------------------------ functions
def forget(path: str | os.PathLike, classes: Sequence[int | str] | str, method: str = "activations",
           params: dict[str, Any] | None = None, *, data: EmbeddingSet | None = None,
           test: EmbeddingSet | None = None, seed: int = 0, metrics: bool = True) -> dict[str, Any]:
    """:meth:`ModelService.forget` on the store at ``path``."""
    return ModelService(path).forget(classes, method, params, data=data, test=test, seed=seed, metrics=metrics)


def restore(path: str | os.PathLike, request_id: str) -> dict[str, Any]:
    """:meth:`ModelService.restore` on the store at ``path``."""
    return ModelService(path).restore(request_id)


def replace_model(path: str | os.PathLike, model: DKVBClassifier, *, data: EmbeddingSet | None = None,
                  **save: Any) -> dict[str, Any]:
    """:meth:`ModelService.replace` on the store at ``path`` (``save``: ``class_names``, ``encoder``,
    ``encoder_config``, ``extra``)."""
    return ModelService(path).replace(model, data=data, **save)


def replay(path: str | os.PathLike, data: EmbeddingSet | None = None) -> Tensor:
    """The key mask replayed from the audit log; raises :class:`ReplayError` unless it equals the
    served model's bit for bit (and every step its logged digest)."""
    result = ModelService(path).replay(data)
    if not result.matches_head:
        raise ReplayError(f"{path}: the replayed key mask differs from the served model's (HEAD)")
    return result.mask


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The verified records of the store's audit log (macs checked when the key is set); raises
    :class:`~dkvb.errors.AuditError` for a store that has served requests and lost its log
    (:meth:`ServedStore.log`)."""
    return ServedStore(path).log()


def recover(path: str | os.PathLike) -> dict[str, Any] | None:
    """:meth:`ModelService.recover` on the store at ``path``."""
    return ModelService(path).recover()


__all__ = [
    "ServedStore", "ModelService", "ReplayResult", "ReplayError", "forget", "restore", "recover", "replace_model",
    "replay",
    "read_log", "method_name", "METHODS", "LOG",
]
