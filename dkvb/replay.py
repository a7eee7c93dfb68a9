"""Replay of a store's audit log: start from the origin model and recompute every request.

Requests of ``dkvb-activations`` with cached counts need nothing but the model; requests that
read embeddings (``dkvb-examples``) are recomputed when the same embeddings are given (their
digest is logged) and otherwise re-applied from the logged mask delta. Each step's mask is
compared bit for bit with the logged digest, and the final mask with the served model's.
"""
from __future__ import annotations


from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor

from .data import EmbeddingSet
from .errors import AuditError, StoreError
from .models import DKVBClassifier
from .request import classes_read, data_digest, flat_mask, make_request, mask_sha, needs_data
from .unlearn import create_unlearner
from .unlearn.activations import UnlearnViaActivations, default_share

Loader = Callable[[str], tuple[DKVBClassifier, dict[str, Any]]]


class ReplayError(StoreError):
    """Replaying the audit log does not reproduce the logged (or the served) key mask."""


@dataclass
class ReplayResult:
    """Outcome of a replay.

    Attributes:
        mask: the replayed key mask after the last record.
        head_mask: the key mask of the served model.
        steps: one entry per record: ``request_id``, ``op`` and ``how`` (``loaded`` for an origin,
            ``loaded, N re-applied`` for a retrained model with the forget requests in effect
            re-applied, ``(logged deltas)`` added where those read embeddings not given,
            ``recomputed``, ``logged delta`` when the embeddings a request read were not given,
            ``unchanged`` for no-ops, prunes and recoveries, ``keys released (mask unchanged)`` for a request
            with ``release_keys`` (it re-fitted values and masked nothing), ``restored``).
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


def replay_records(records: list[dict[str, Any]], load: Loader, data: EmbeddingSet | None, where: str) -> ReplayResult:
    """Replay verified ``records``; ``load(version)`` gives a stored model and its manifest."""
    if not records or records[0]["op"] != "origin":
        raise AuditError(f"{where}: no requests logged yet" if not records else
                         f"{where}: the log does not start with an origin record")
    states: dict[str, tuple[Tensor, DKVBClassifier, list[str]]] = {}
    steps = []
    for rec in records:
        rid, op = rec["request_id"], rec["op"]
        if op == "origin":
            model, manifest = load(rec["version"])
            mask, names, how = model.key_mask.clone(), list(manifest["class_names"]), "loaded"
            hows = []
            for step in rec.get("reapplied", []):  # forget requests re-applied to a retrained model
                mask, step_how = _replay_forget({**step, "request_id": f"{rid} (re-applying {step['request_id']})"},
                                                model, names, mask, data)
                hows.append(step_how)
            if hows:
                how = f"loaded, {len(hows)} re-applied" + ("" if set(hows) == {"recomputed"} else " (logged deltas)")
        elif op == "restore":
            if rec["to"] not in states:
                raise ReplayError(f"{rid}: restores unknown request {rec['to']!r}")
            (mask, model, names), how = states[rec["to"]], "restored"
        elif op in ("prune", "recover") or (op == "forget" and rec.get("noop")):
            how = "unchanged"
        elif op == "forget":
            mask, how = _replay_forget(rec, model, names, mask, data)
        else:
            raise ReplayError(f"{rid}: unknown record op {op!r}")
        if rec.get("mask_sha256") is not None and mask_sha(mask) != rec["mask_sha256"]:
            raise ReplayError(f"{rid}: the replayed key mask ({how}) differs from the logged one (mask_sha256)")
        states[rid] = (mask, model, names)
        steps.append({"request_id": rid, "op": op, "how": how})
    served, _ = load(records[-1]["version_after"])
    return ReplayResult(mask, served.key_mask.clone(), steps)


def _replay_forget(
    rec: dict[str, Any], model: DKVBClassifier, names: list[str], mask: Tensor, data: EmbeddingSet | None
) -> tuple[Tensor, str]:
    """The mask after a logged forget request: recomputed when possible, else the logged delta."""
    logged = _logged_unlearner(rec, model)
    if getattr(logged, "release_keys", False):  # nothing masked: the request re-fitted values only
        return mask, "keys released (mask unchanged)"
    # the mask does not depend on re-fitted values: replay recomputes the mask only
    unlearner = replace(logged, refit_epochs=0) if getattr(logged, "refit_epochs", 0) else logged
    model.bottleneck.key_mask = mask.clone()
    ids = [names.index(c) for c in rec["new_classes"]]
    digest = rec.get("data_sha256")
    given = None
    if digest is not None and data is not None:
        if list(data.class_names) != names or data_digest(data, classes_read(logged, ids, len(names), model)) != digest:
            raise ReplayError(f"{rec['request_id']}: the given embeddings differ from those the request read "
                              "(data_sha256); pass the same embeddings, or none to re-apply logged deltas")
        given = data
    if needs_data(unlearner, model) and given is None:
        delta = torch.zeros(mask.numel(), dtype=torch.bool)
        delta[torch.as_tensor(rec["mask_delta"], dtype=torch.long)] = True
        return mask | delta.view_as(mask), "logged delta"
    request, _ = make_request(unlearner, model, ids, given, int(rec.get("seed", 0)))
    after = unlearner.unlearn(model, request).model.key_mask
    if flat_mask(after & ~mask) != rec["mask_delta"]:
        raise ReplayError(f"{rec['request_id']}: recomputing {rec['method']} on {rec['new_classes']} masks other "
                          "keys than logged (mask_delta)")
    return after.clone(), "recomputed"


def _logged_unlearner(rec: dict[str, Any], model: DKVBClassifier):
    """The unlearner a forget record was computed with. The service logs the share rule's
    resolved ``min_share``; a ``dkvb-activations`` record that left it unset was logged before
    that (commit e812c6f, 2026-11-28), when the default was the projection's factor alone
    (:data:`~dkvb.unlearn.activations.SHARE_FACTOR`, also for probe-started models)."""
    logged = create_unlearner(rec["method"], **rec["params"])
    if isinstance(logged, UnlearnViaActivations) and logged.rule == "share" and logged.min_share is None:
        logged = replace(logged, min_share=default_share(model, len(rec["new_classes"]), start_factor=False))
    return logged


__all__ = ["ReplayError", "ReplayResult", "replay_records"]
