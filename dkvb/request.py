"""What one forget request of the service reads and writes: the method, the unlearner's request,
the digests the audit log keeps of the embeddings it read and of the key mask it produced, and
the metrics it reports. Shared by the service (:mod:`dkvb.service`) and replay (:mod:`dkvb.replay`)."""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
from torch import Tensor

from .data import EmbeddingSet, remembered
from .models import DKVBClassifier
from .store import tensor_sha256
from .unlearn import ForgetRequest
from .unlearn.masking import MaskingUnlearner

METHODS = {"activations": "dkvb-activations", "examples": "dkvb-examples"}


def method_name(name: str) -> str:
    """Registry name of a service method: ``activations``/``examples`` or their full names."""
    full = METHODS.get(name, name)
    if full not in METHODS.values():
        raise ValueError(f"unknown method {name!r}: the service applies masking methods only, "
                         f"choose from {sorted(METHODS)} (or {sorted(METHODS.values())})")
    return full


def mask_sha(mask: Tensor) -> str:
    return tensor_sha256(mask.bool())


def flat_mask(mask: Tensor) -> list[int]:
    """Flat indices of the set entries of a key mask (how the log stores a mask delta)."""
    return mask.flatten().nonzero().flatten().tolist()


def data_digest(data: EmbeddingSet, ids: Sequence[int]) -> str:
    """Digest of the embeddings and labels of classes ``ids`` in ``data`` (what a request read); of
    every class (a ridge solve's request), remembered for the set until it is written to."""
    rows = data.class_mask(ids)
    if bool(rows.all()):
        x, y = remembered(data.x, "sha256", tensor_sha256), remembered(data.y, "sha256", tensor_sha256)
    else:
        x, y = tensor_sha256(data.x[rows]), tensor_sha256(data.y[rows])
    return hashlib.sha256(f"{x}|{y}".encode()).hexdigest()


def check_data(data: EmbeddingSet | None, model: DKVBClassifier, names: list[str], what: str) -> None:
    """Refuse embeddings the model cannot take (size, class names, NaN/inf), naming ``what``."""
    if data is None:
        return
    if data.dim != model.input_dim:
        raise ValueError(f"{what}: wrong embedding size: the model expects {model.input_dim}, got {data.dim}")
    if list(data.class_names) != names:
        raise ValueError(f"{what}: class names {list(data.class_names)[:5]}... differ from the model's "
                         f"{names[:5]}...")
    if len(data) and not bool(torch.isfinite(data.x).all()):
        raise ValueError(f"{what}: embeddings contain NaN or inf values")


def solves_ridge(unlearner: Any, model: Any) -> bool:
    """Whether a request of ``unlearner`` solves ``model``'s ridge values again on the retain rows
    (:meth:`~dkvb.unlearn.masking.MaskingUnlearner.solves_ridge`)."""
    return isinstance(unlearner, MaskingUnlearner) and unlearner.solves_ridge(model)


def needs_data(unlearner: Any, model: DKVBClassifier) -> bool:
    """Whether the method reads embeddings (else it runs on the model's cached counts alone)."""
    cached = getattr(unlearner, "use_cached_counts", False) and model.activation_counts.numel() > 0
    return (unlearner.name != "dkvb-activations" or not cached or getattr(unlearner, "refit_epochs", 0) > 0
            or solves_ridge(unlearner, model))


def make_request(
    unlearner: Any, model: DKVBClassifier, ids: Sequence[int], data: EmbeddingSet | None, seed: int,
    forgotten: Sequence[int] = (),
) -> tuple[ForgetRequest, str | None]:
    """The request for ``ids`` (``forgotten``: classes earlier requests removed) and the digest of
    the embeddings the method reads (or None).

    A method that runs on cached counts alone gets a placeholder training set with one zero row
    per class: the cached-count path of ``dkvb-activations`` reads only the class list.
    """
    if not needs_data(unlearner, model):
        names = tuple(data.class_names) if data is not None else tuple(f"c{i}" for i in range(model.num_classes))
        stub = EmbeddingSet(torch.zeros(model.num_classes, model.input_dim), torch.arange(model.num_classes), names)
        return ForgetRequest(tuple(ids), stub, seed=seed, forgotten=tuple(forgotten)), None
    if data is None:
        raise ValueError(f"{unlearner.name} reads training embeddings here (forget examples, or activation counts "
                         "the model has not cached): give them with --embeddings or --config")
    return (ForgetRequest(tuple(ids), data, seed=seed, forgotten=tuple(forgotten)),
            data_digest(data, classes_read(unlearner, ids, model.num_classes, model)))


def classes_read(unlearner: Any, ids: Sequence[int], num_classes: int, model: Any = None) -> Sequence[int]:
    """The classes whose embeddings a request for ``ids`` reads (and its log digest covers):
    the forget classes, or every class when the method re-fits values on the retain set or solves
    ``model``'s ridge values again."""
    every = getattr(unlearner, "refit_epochs", 0) or solves_ridge(unlearner, model)
    return range(num_classes) if every else ids


def metrics(model: DKVBClassifier, train: EmbeddingSet, test: EmbeddingSet | None, ids: list[int]) -> dict[str, float]:
    """Accuracies after a request on all forgotten classes ``ids`` (full metrics with ``test``)."""
    from .evaluate import accuracy, evaluate, predict_logits

    if test is not None:
        return evaluate(model, train, test, ids)
    logits = predict_logits(model, train.x)
    f = train.class_mask(ids)
    return {"forget_train_acc": accuracy(logits[f], train.y[f]), "retain_train_acc": accuracy(logits[~f], train.y[~f])}


__all__ = ["METHODS", "method_name", "mask_sha", "flat_mask", "data_digest", "check_data", "needs_data",
           "make_request", "classes_read", "solves_ridge", "metrics"]
