"""Unlearning as a service: forget and restore requests against a stored model, each one logged.

A request is applied to the store's ``HEAD`` model and commits a new version (for the masking
unlearners only the key mask is written; every other tensor is shared with the full version it
rests on, see :mod:`dkvb.store`). Every request appends one JSON line to ``audit.jsonl`` in the
store folder::

    {"request_id": "req-000002", "op": "forget", "time": "...", "classes": ["cat"], "method": "dkvb-activations",
     "params": {...}, "keys_masked": 37, "mask_delta": [...], "mask_sha256": "...", "forgotten": ["cat"],
     "model_sha256_before": "...", "model_sha256_after": "...", "version_before": "000001",
     "version_after": "000002", "metrics": {...}, "prev_sha256": "..."}

Record kinds (``op``): ``origin`` (the model requests start from: written before the first
request, and again when ``HEAD`` was moved outside the service, e.g. by saving a retrained
model), ``forget`` and ``restore``. ``prev_sha256`` chains each line to the one before, so an
edited or cut log is detected.

Commit order (under the store's writer lock): write the new version, append the record (fsync),
move ``HEAD``. The record is the commit point: a writer killed before it leaves an unreferenced
version (the request did not happen), one killed after it leaves ``HEAD`` one step behind, and
the next request rolls ``HEAD`` forward. A cut last line (killed mid-append) is dropped.

Replay (:func:`replay`) starts from the origin model and recomputes every request: requests of
``dkvb-activations`` with cached counts need nothing but the model; requests that read
embeddings (``dkvb-examples``) are recomputed when the same embeddings are given (their digest is
logged) and otherwise re-applied from the logged mask delta. Each step's mask is compared bit for
bit with the logged digest and the final mask with ``HEAD``'s.

The log never holds embeddings, only digests of them, so it does not retain forgotten data; the
model's earlier versions do hold the forgotten classes' values (masking hides them, see
:mod:`dkvb.verify`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .data import EmbeddingSet, resolve_classes
from .io import atomic_write_text, fsync_dir
from .models import DKVBClassifier
from .store import (
    StoreError, current_version, list_versions, load_model, model_sha256, read_manifest, save_model, tensor_sha256,
    writer_lock,
)
from .unlearn import ForgetRequest, create_unlearner

log = logging.getLogger("dkvb")

LOG = "audit.jsonl"
METHODS = {"activations": "dkvb-activations", "examples": "dkvb-examples"}


class ReplayError(StoreError):
    """Replaying the audit log does not reproduce the logged (or the current) key mask."""


def method_name(name: str) -> str:
    """Registry name of a service method: ``activations``/``examples`` or their full names."""
    full = METHODS.get(name, name)
    if full not in METHODS.values():
        raise ValueError(f"unknown method {name!r}: the service applies masking methods only, "
                         f"choose from {sorted(METHODS)} (or {sorted(METHODS.values())})")
    return full


# ------------------------------------------------------------------ embeddings
def load_embeddings_file(path: str | os.PathLike, class_names: Sequence[str]) -> EmbeddingSet:
    """Embeddings with labels from a file: ``.pt``/``.pth`` or ``.safetensors`` or ``.npz`` holding
    ``x`` and ``y``; ``.npy`` holding ``x`` with labels in ``labels.npy`` (beside ``embeddings.npy``)
    or ``<stem>_labels.npy``; or a cached split folder of :mod:`dkvb.cache`.

    Raises ``ValueError`` naming the problem (missing arrays, wrong shapes, NaN/inf, labels out of
    range) and ``FileNotFoundError``.
    """
    p = Path(path)
    if p.is_dir():
        from .cache import load_cached

        data = load_cached(p, class_names)
        _check_finite(data.x, p)
        return data
    if not p.is_file():
        raise FileNotFoundError(f"embeddings file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
            x, y = _pick(obj, p)
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            x, y = _pick(load_file(str(p)), p)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                x, y = _pick({k: z[k] for k in z.files}, p)
        elif suffix == ".npy":
            labels = p.with_name("labels.npy") if p.name == "embeddings.npy" else p.with_name(f"{p.stem}_labels.npy")
            if not labels.is_file():
                raise ValueError(f"{p}: labels not found (expected {labels})")
            x, y = np.load(p, allow_pickle=False), np.load(labels, allow_pickle=False)
        else:
            raise ValueError(f"{p}: unsupported embeddings file (use .pt, .safetensors, .npz, .npy or a cache folder)")
    except ValueError:
        raise
    except Exception as e:  # unpickling/format errors of the readers above
        raise ValueError(f"{p}: unreadable embeddings ({type(e).__name__}: {e})") from e
    x, y = torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y))
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)) or x.ndim != 2:
        raise ValueError(f"{p}: x must be a 2-D float array (N, D), got {tuple(x.shape)} {x.dtype}")
    if y.is_floating_point() or y.dtype == torch.bool or y.ndim != 1:
        raise ValueError(f"{p}: y must be a 1-D integer array, got {tuple(y.shape)} {y.dtype}")
    x = x.float()
    _check_finite(x, p)
    return EmbeddingSet(x, y.long(), tuple(class_names))


def _pick(obj: Any, p: Path) -> tuple[Any, Any]:
    if not isinstance(obj, dict) or "x" not in obj or "y" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{p}: expected arrays 'x' (embeddings) and 'y' (labels), found {keys}")
    return obj["x"], obj["y"]


def _check_finite(x: Tensor, p: Path) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{p}: embeddings contain NaN or inf values")


def embeddings_from_config(
    path: str | os.PathLike, overrides: list[str] | None = None
) -> tuple[EmbeddingSet, EmbeddingSet]:
    """(train, test) embeddings of an experiment config, from its embedding cache."""
    from .config import load_config
    from .experiment import load_embeddings

    return load_embeddings(load_config(path, overrides), progress=False)


# ------------------------------------------------------------------ audit log
def _line_sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of the audit log, oldest first (a cut last line, left by a killed writer, is skipped).

    Raises :class:`StoreError` for a line that is not a JSON record or breaks the hash chain.
    """
    return _read_log(path)[0]


def _read_log(path: str | os.PathLike) -> tuple[list[dict[str, Any]], str | None]:
    """(records, sha256 of the last complete line)."""
    file = Path(path) / LOG
    if not file.is_file():
        return [], None
    data = file.read_bytes()
    lines = data.split(b"\n")[:-1]  # the part after the last newline is an unfinished append
    records, prev = [], None
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{file}: line {n} is not a JSON record ({e}); the audit log is corrupt") from e
        if not isinstance(record, dict) or "op" not in record or "request_id" not in record:
            raise StoreError(f"{file}: line {n} is not an audit record; the audit log is corrupt")
        if record.get("prev_sha256") != prev:
            raise StoreError(f"{file}: line {n}: field prev_sha256 does not match line {n - 1}; "
                             "the audit log was edited or lines were removed")
        records.append(record)
        prev = _line_sha(line)
    return records, prev


def _mask_sha(mask: Tensor) -> str:
    return tensor_sha256(mask.bool())


def _flat(mask: Tensor) -> list[int]:
    return mask.flatten().nonzero().flatten().tolist()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _data_digest(data: EmbeddingSet, ids: Sequence[int]) -> str:
    """Digest of the embeddings and labels of classes ``ids`` in ``data`` (what a request read)."""
    rows = data.class_mask(ids)
    return hashlib.sha256(f"{tensor_sha256(data.x[rows])}|{tensor_sha256(data.y[rows])}".encode()).hexdigest()


# ------------------------------------------------------------------ service
@dataclass
class ReplayResult:
    """Outcome of :meth:`ModelService.replay`.

    Attributes:
        mask: the replayed key mask after the last record.
        head_mask: the key mask of the store's ``HEAD`` model.
        steps: one entry per record: ``request_id``, ``op`` and ``how`` (``loaded`` for an origin,
            ``recomputed``, ``logged delta`` when the embeddings a request read were not given,
            ``unchanged`` for no-ops, ``restored``).
    """

    mask: Tensor
    head_mask: Tensor
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def matches_head(self) -> bool:
        return torch.equal(self.mask, self.head_mask)

    @property
    def recomputed(self) -> int:
        return sum(s["how"] == "recomputed" for s in self.steps)


class ModelService:
    """Forget/restore requests against the model store at ``path``, each appended to its audit log.

    Writers take the store's lock for the whole request, so a second concurrent writer fails at
    once with :class:`~dkvb.store.StoreLockedError`. The service keeps the full versions it has
    verified in memory, so a request loads and verifies only the small key-mask file of ``HEAD``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.root = Path(path)
        self._full: dict[str, tuple[str, dict[str, Tensor]]] = {}
        self._count, self._prev = 0, None  # records in the log and sha256 of its last line (set by _sync)
        self._origin: dict[str, Any] | None = None  # an origin record to write before the next one

    # -------------------------------------------------------------- reading
    def load(self, version: str | None = None) -> tuple[DKVBClassifier, dict[str, Any]]:
        """A verified DKVB model of the store (default: ``HEAD``) and its manifest.

        Raises ``ValueError`` for another kind of model: the service masks keys.
        """
        model, manifest = load_model(self.root, version, cache=self._full)
        if not isinstance(model, DKVBClassifier):
            raise ValueError(f"{self.root}: the service forgets by masking keys of DKVB models; this store holds a "
                             f"{model.config.get('kind')!r} model")
        return model, manifest

    def log(self) -> list[dict[str, Any]]:
        return read_log(self.root)

    @staticmethod
    def forgotten_of(manifest: dict[str, Any]) -> list[str]:
        """Classes forgotten through the service in the model a manifest describes."""
        service = _extra(manifest).get("service")
        return list(service.get("forgotten", [])) if isinstance(service, dict) else []

    # -------------------------------------------------------------- writing
    def forget(
        self,
        classes: Sequence[int | str] | str,
        method: str = "activations",
        params: dict[str, Any] | None = None,
        *,
        data: EmbeddingSet | None = None,
        test: EmbeddingSet | None = None,
        seed: int = 0,
        metrics: bool = True,
    ) -> dict[str, Any]:
        """Forget ``classes`` (names or indices) from the ``HEAD`` model; returns the logged record.

        Args:
            method: ``activations`` or ``examples`` (or ``dkvb-activations``/``dkvb-examples``).
            params: the method's hyperparameters.
            data: training embeddings. ``examples`` needs them (it draws forget examples);
                ``activations`` needs none when the model has cached counts. With ``data`` the
                record gets accuracies after the request on all forgotten classes; with ``test``
                too, the full metrics including the membership-inference score.
            seed: seeds the draw of forget examples.
            metrics: ``False`` skips the metrics even when embeddings are given (they cost a
                forward pass over them).

        Classes already forgotten are skipped with a notice (a request naming only forgotten
        classes is a logged no-op and writes no version).

        Raises ``ValueError`` for unknown classes or methods, a request that would forget every
        class or mask a whole codebook, or missing/mismatched embeddings;
        :class:`~dkvb.store.StoreLockedError` while another writer is active.
        """
        name = method_name(method)
        unlearner = create_unlearner(name, **(params or {}))
        self._require_store()
        with writer_lock(self.root):
            self._sync()
            head = current_version(self.root)
            model, manifest = self.load(head)
            names = list(manifest["class_names"])
            ids = resolve_classes(classes, names)
            _check_data(data, model, names, "data")
            _check_data(test, model, names, "test")
            done = self.forgotten_of(manifest)
            new = [i for i in ids if names[i] not in done]
            already = [names[i] for i in ids if names[i] in done]
            if already:
                log.info("already forgotten, nothing to do for: %s", ", ".join(already))
            record: dict[str, Any] = {
                "op": "forget", "classes": [names[i] for i in ids], "new_classes": [names[i] for i in new],
                "already_forgotten": already, "method": name, "params": unlearner.params, "seed": seed,
            }
            before_sha = manifest.get("model_sha256") or model_sha256(model)
            if not new:
                record.update(noop=True, keys_masked=0, keys_masked_total=int(model.key_mask.sum()),
                              mask_delta=[], mask_sha256=_mask_sha(model.key_mask), forgotten=done,
                              model_sha256_before=before_sha, model_sha256_after=before_sha,
                              version_before=head, version_after=head)
                return self._commit(record, head)
            if len(done) + len(new) >= len(names):
                raise ValueError(f"cannot forget every class ({len(done) + len(new)} of {len(names)}): "
                                 "nothing would be retained")
            request, digest = _request(unlearner, model, new, data, seed)
            start = time.perf_counter()
            report = unlearner.unlearn(model, request)
            seconds = time.perf_counter() - start
            after = report.model
            delta = after.key_mask & ~model.key_mask
            forgotten = done + [names[i] for i in new]
            scores = (_metrics(after, data, test, [names.index(c) for c in forgotten])
                      if data is not None and metrics else None)
            extra = {k: v for k, v in _extra(manifest).items() if k != "fingerprint"}
            extra["service"] = {"request_id": self._next_id(), "forgotten": forgotten}
            full = manifest.get("shared", {}).get("version", head)
            version = save_model(after, self.root, class_names=names, encoder=manifest["encoder"], extra=extra,
                                 base=head, base_tensors=self._full.get(full, (None, None))[1], update_head=False)
            record.update(
                noop=False, keys_masked=int(delta.sum()), keys_masked_total=int(after.key_mask.sum()),
                mask_delta=_flat(delta), mask_sha256=_mask_sha(after.key_mask), forgotten=forgotten,
                data_sha256=digest, flops=report.flops, seconds=seconds,
                model_sha256_before=before_sha, model_sha256_after=read_manifest(self.root, version)["model_sha256"],
                version_before=head, version_after=version,
            )
            if scores is not None:
                record["metrics"] = scores
            return self._commit(record, version)

    def restore(self, to: str) -> dict[str, Any]:
        """Move ``HEAD`` back to the model right after request ``to`` (a request id, or ``origin``
        for the model the first request started from); logged like a request."""
        self._require_store()
        with writer_lock(self.root):
            records = self._sync()
            target = _find(records, to)
            head = current_version(self.root)
            version = target["version_after"]
            before, manifest_before = self.load(head)
            after, manifest_after = self.load(version)
            record = {
                "op": "restore", "to": target["request_id"], "noop": version == head,
                "mask_sha256": _mask_sha(after.key_mask), "forgotten": self.forgotten_of(manifest_after),
                "model_sha256_before": manifest_before.get("model_sha256") or model_sha256(before),
                "model_sha256_after": manifest_after.get("model_sha256") or model_sha256(after),
                "version_before": head, "version_after": version,
            }
            if version == head:
                log.info("HEAD is already the model after %s; nothing to restore", target["request_id"])
            return self._commit(record, version)

    def replay(self, data: EmbeddingSet | None = None) -> ReplayResult:
        """Recompute every logged request from the origin model (see the module docstring).

        Raises :class:`ReplayError` where a replayed mask differs from the logged one, and
        :class:`~dkvb.store.StoreError` for an empty or corrupt log.
        """
        records = self.log()
        if not records or records[0]["op"] != "origin":
            raise StoreError(f"{self.root / LOG}: no requests logged yet" if not records else
                             f"{self.root / LOG}: the log does not start with an origin record")
        states: dict[str, tuple[Tensor, DKVBClassifier, list[str]]] = {}
        steps = []
        for rec in records:
            rid, op = rec["request_id"], rec["op"]
            if op == "origin":
                model, manifest = self.load(rec["version"])
                mask, names, how = model.key_mask.clone(), list(manifest["class_names"]), "loaded"
            elif op == "restore":
                if rec["to"] not in states:
                    raise ReplayError(f"{rid}: restores unknown request {rec['to']!r}")
                (mask, model, names), how = states[rec["to"]], "restored"
            elif op == "forget" and rec.get("noop"):
                how = "unchanged"
            elif op == "forget":
                mask, how = _replay_forget(rec, model, names, mask, data)
            else:
                raise ReplayError(f"{rid}: unknown record op {op!r}")
            if _mask_sha(mask) != rec["mask_sha256"]:
                raise ReplayError(f"{rid}: the replayed key mask ({how}) differs from the logged one (mask_sha256)")
            states[rid] = (mask, model, names)
            steps.append({"request_id": rid, "op": op, "how": how})
        head, _ = self.load()
        return ReplayResult(mask, head.key_mask.clone(), steps)

    # -------------------------------------------------------------- log plumbing
    def _require_store(self) -> None:
        """Refuse to write to a folder that is not a model store (so a typo creates nothing)."""
        if current_version(self.root) is None:
            raise StoreError(f"no stored model at {self.root} (HEAD is missing)")

    def _next_id(self) -> str:
        return f"req-{self._count + 1 + (self._origin is not None):06d}"

    def _commit(self, record: dict[str, Any], version: str) -> dict[str, Any]:
        """Append the pending origin record (if any) and ``record`` (the commit point), then point
        ``HEAD`` at ``version``."""
        if self._origin is not None:
            origin, self._origin = self._origin, None
            self._append({"request_id": origin.pop("request_id"), "op": "origin", "time": _now(), **origin})
        record = {"request_id": self._next_id(), "op": record["op"], "time": _now(), **record}
        self._append(record)
        if current_version(self.root) != version:
            atomic_write_text(self.root / "HEAD", version + "\n")
        return record

    def _append(self, record: dict[str, Any]) -> None:
        file = self.root / LOG
        line = json.dumps({**record, "prev_sha256": self._prev}, separators=(",", ":")).encode()
        new = not file.exists()
        with open(file, "ab") as f:
            f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.root)
        self._count, self._prev = self._count + 1, _line_sha(line)

    def _sync(self) -> list[dict[str, Any]]:
        """Bring log and ``HEAD`` in line (writer lock held); returns the records.

        Drops a cut last line and rolls ``HEAD`` forward to a logged request whose writer died
        before moving it. A ``HEAD`` the log does not know (first request, or a model saved
        outside the service) gets an origin record, returned last and written by :meth:`_commit`
        just before the request's own record, so a request that fails writes nothing.
        """
        self._origin = None
        file = self.root / LOG
        if file.is_file():
            data = file.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                log.warning("%s: dropping an unfinished last line left by a killed writer", file)
                with open(file, "r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())
        records, self._prev = _read_log(self.root)
        self._count = len(records)
        head = current_version(self.root)
        if head is None:
            raise StoreError(f"{self.root}: HEAD is missing; not a dkvb model store")
        last = records[-1] if records else None
        if last is not None and last["version_after"] != head:
            if last.get("version_before") == head and last["version_after"] in list_versions(self.root):
                log.warning("%s was logged but HEAD was not moved (killed writer); moving HEAD to %s",
                            last["request_id"], last["version_after"])
                atomic_write_text(self.root / "HEAD", last["version_after"] + "\n")
                return records
        if last is None or last["version_after"] != head:
            model, manifest = self.load(head)
            note = ("the model requests start from" if last is None else
                    f"HEAD moved outside the service (from {last['version_after']} to {head}); later requests "
                    "build on this model")
            if last is not None:
                log.warning("%s: %s", self.root, note)
            self._origin = {"request_id": self._next_id(), "op": "origin", "version": head, "note": note,
                            "model_sha256": manifest.get("model_sha256") or model_sha256(model),
                            "mask_sha256": _mask_sha(model.key_mask), "forgotten": self.forgotten_of(manifest),
                            "version_after": head}
            return records + [self._origin]
        return records


# ------------------------------------------------------------------ helpers
def _extra(manifest: dict[str, Any]) -> dict[str, Any]:
    extra = manifest.get("extra")
    return extra if isinstance(extra, dict) else {}


def _check_data(data: EmbeddingSet | None, model: DKVBClassifier, names: list[str], what: str) -> None:
    if data is None:
        return
    if data.dim != model.input_dim:
        raise ValueError(f"{what}: wrong embedding size: the model expects {model.input_dim}, got {data.dim}")
    if list(data.class_names) != names:
        raise ValueError(f"{what}: class names {list(data.class_names)[:5]}... differ from the model's "
                         f"{names[:5]}...")
    if len(data) and not bool(torch.isfinite(data.x).all()):
        raise ValueError(f"{what}: embeddings contain NaN or inf values")


def _needs_data(unlearner: Any, model: DKVBClassifier) -> bool:
    """Whether the method reads embeddings (else it runs on the model's cached counts alone)."""
    cached = getattr(unlearner, "use_cached_counts", False) and model.activation_counts.numel() > 0
    return unlearner.name != "dkvb-activations" or not cached


def _request(
    unlearner: Any, model: DKVBClassifier, ids: Sequence[int], data: EmbeddingSet | None, seed: int
) -> tuple[ForgetRequest, str | None]:
    """The request for ``ids`` and the digest of the forget embeddings the method reads (or None).

    A method that runs on cached counts alone gets a placeholder training set with one zero row
    per class: the cached-count path of ``dkvb-activations`` reads only the class list.
    """
    if not _needs_data(unlearner, model):
        names = tuple(data.class_names) if data is not None else tuple(f"c{i}" for i in range(model.num_classes))
        stub = EmbeddingSet(torch.zeros(model.num_classes, model.input_dim), torch.arange(model.num_classes), names)
        return ForgetRequest(tuple(ids), stub, seed=seed), None
    if data is None:
        raise ValueError(f"{unlearner.name} reads training embeddings here (forget examples, or activation counts "
                         "the model has not cached): give them with --embeddings or --config")
    return ForgetRequest(tuple(ids), data, seed=seed), _data_digest(data, ids)


def _replay_forget(
    rec: dict[str, Any], model: DKVBClassifier, names: list[str], mask: Tensor, data: EmbeddingSet | None
) -> tuple[Tensor, str]:
    """The mask after a logged forget request: recomputed when possible, else the logged delta."""
    unlearner = create_unlearner(rec["method"], **rec["params"])
    model.bottleneck.key_mask = mask.clone()
    ids = [names.index(c) for c in rec["new_classes"]]
    digest = rec.get("data_sha256")
    given = None
    if digest is not None and data is not None:
        if list(data.class_names) != names or _data_digest(data, ids) != digest:
            raise ReplayError(f"{rec['request_id']}: the given embeddings differ from those the request read "
                              "(data_sha256); pass the same embeddings, or none to re-apply logged deltas")
        given = data
    if _needs_data(unlearner, model) and given is None:
        delta = torch.zeros(mask.numel(), dtype=torch.bool)
        delta[torch.as_tensor(rec["mask_delta"], dtype=torch.long)] = True
        return mask | delta.view_as(mask), "logged delta"
    request, _ = _request(unlearner, model, ids, given, int(rec.get("seed", 0)))
    after = unlearner.unlearn(model, request).model.key_mask
    if _flat(after & ~mask) != rec["mask_delta"]:
        raise ReplayError(f"{rec['request_id']}: recomputing {rec['method']} on {rec['new_classes']} masks other "
                          "keys than logged (mask_delta)")
    return after.clone(), "recomputed"


def _find(records: list[dict[str, Any]], to: str) -> dict[str, Any]:
    if to == "origin":
        return next(r for r in records if r["op"] == "origin")
    for r in records:
        if r["request_id"] == to:
            return r
    raise ValueError(f"unknown request id {to!r}; known: {[r['request_id'] for r in records][-10:]} (last 10) "
                     "or 'origin'")


def _metrics(model: DKVBClassifier, train: EmbeddingSet, test: EmbeddingSet | None, ids: list[int]) -> dict[str, float]:
    from .evaluate import accuracy, evaluate, predict_logits

    if test is not None:
        return evaluate(model, train, test, ids)
    logits = predict_logits(model, train.x)
    f = train.class_mask(ids)
    return {"forget_train_acc": accuracy(logits[f], train.y[f]), "retain_train_acc": accuracy(logits[~f], train.y[~f])}


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
    """The key mask replayed from the audit log; raises :class:`ReplayError` unless it equals
    ``HEAD``'s bit for bit (and every step its logged digest)."""
    result = ModelService(path).replay(data)
    if not result.matches_head:
        raise ReplayError(f"{path}: the replayed key mask differs from HEAD's")
    return result.mask


__all__ = [
    "ModelService", "ReplayResult", "ReplayError", "forget", "restore", "replay", "read_log",
    "load_embeddings_file", "embeddings_from_config", "method_name", "METHODS", "LOG",
]
