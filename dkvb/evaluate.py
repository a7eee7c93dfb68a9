"""One evaluation path for every method: accuracies on forget/retain x train/test and an MIA score."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

from .data import EmbeddingSet

METRICS = ("forget_train_acc", "forget_test_acc", "retain_train_acc", "retain_test_acc", "mia")


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, *, batch_size: int = 8192) -> Tensor:
    """Logits of ``model`` on ``x`` in eval mode, batched."""
    model.eval()
    if x.shape[0] == 0:
        return torch.empty(0, model.num_classes)
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in [0, 1]; NaN for an empty set."""
    return float((logits.argmax(1) == y).float().mean()) if len(y) else float("nan")


def entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy of the softmax output."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1)


def membership_attack(
    member_logits: Tensor, nonmember_logits: Tensor, target_logits: Tensor, *, max_samples: int = 4000, seed: int = 0
) -> float:
    """SCRUB's membership-inference probe: fraction of ``target`` samples predicted to be members.

    A logistic regression on the softmax entropy is trained to tell members (retain-train)
    from non-members (retain-test), balanced, at most ``max_samples`` each, then applied to the
    target (forget-train). The original model scores high; a model that has truly forgotten
    scores like the retrained one (low).
    """
    if min(len(member_logits), len(nonmember_logits), len(target_logits)) == 0:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    n = min(max_samples, len(member_logits), len(nonmember_logits))
    mem = entropy(member_logits[torch.randperm(len(member_logits), generator=g)[:n]])
    non = entropy(nonmember_logits[torch.randperm(len(nonmember_logits), generator=g)[:n]])
    feats = torch.cat([mem, non]).numpy().reshape(-1, 1)
    labels = np.r_[np.ones(n), np.zeros(n)]
    clf = LogisticRegression(class_weight="balanced", solver="lbfgs", random_state=seed)
    clf.fit(feats, labels)
    return float(clf.predict(entropy(target_logits).numpy().reshape(-1, 1)).mean())


def evaluate(
    model: nn.Module, train: EmbeddingSet, test: EmbeddingSet, forget_classes: Sequence[int], *, seed: int = 0
) -> dict[str, float]:
    """Accuracy on forget/retain x train/test and the MIA score, all in [0, 1]."""
    return metrics_from_logits(predict_logits(model, train.x), predict_logits(model, test.x), train, test,
                               forget_classes, seed=seed)


def metrics_from_logits(
    tr_logits: Tensor, te_logits: Tensor, train: EmbeddingSet, test: EmbeddingSet, forget_classes: Sequence[int],
    *, seed: int = 0,
) -> dict[str, float]:
    """:func:`evaluate` on precomputed logits (lets one model's logits serve many forget requests)."""
    return {**accuracies_from_logits(tr_logits, te_logits, train, test, forget_classes),
            "mia": mia_from_logits(tr_logits, te_logits, train, test, forget_classes, seed=seed)}


def accuracies_from_logits(
    tr_logits: Tensor, te_logits: Tensor, train: EmbeddingSet, test: EmbeddingSet, forget_classes: Sequence[int],
) -> dict[str, float]:
    """Accuracy on forget/retain x train/test from precomputed logits."""
    f_tr, f_te = train.class_mask(forget_classes), test.class_mask(forget_classes)
    return {
        "forget_train_acc": accuracy(tr_logits[f_tr], train.y[f_tr]),
        "forget_test_acc": accuracy(te_logits[f_te], test.y[f_te]),
        "retain_train_acc": accuracy(tr_logits[~f_tr], train.y[~f_tr]),
        "retain_test_acc": accuracy(te_logits[~f_te], test.y[~f_te]),
    }


def mia_from_logits(
    tr_logits: Tensor, te_logits: Tensor, train: EmbeddingSet, test: EmbeddingSet, forget_classes: Sequence[int],
    *, seed: int = 0,
) -> float:
    """:func:`membership_attack` (retain-train vs retain-test, applied to forget-train) from precomputed logits."""
    f_tr, f_te = train.class_mask(forget_classes), test.class_mask(forget_classes)
    return membership_attack(tr_logits[~f_tr], te_logits[~f_te], tr_logits[f_tr], seed=seed)
