"""Did the model forget? Accuracy, membership inference and a relearning probe, next to retraining.

:func:`verify` returns the :data:`VERIFY_COLUMNS` for one unlearned model:

* ``forget_train_acc``, ``forget_test_acc``, ``retain_test_acc``: accuracies of the unlearned model.
* ``mia`` and ``mia_retrain``: SCRUB's membership-inference score on forget-train
  (:func:`dkvb.evaluate.membership_attack`) for the unlearned and for a model retrained from
  scratch on the retain set; forgetting as well as retraining means ``mia`` close to ``mia_retrain``.
* ``relearn_steps`` and ``relearn_steps_retrain``: the relearning probe. Fine-tune a copy with
  plain SGD (fixed ``lr``, full batch) on a few forget-train examples and count the steps until
  its forget-test accuracy reaches ``relearn_target_acc`` (a share of the original model's);
  ``inf`` when it does not within ``max_steps``. A model that only hides the forget classes
  relearns them in far fewer steps than the retrained one.
* ``forget_test_acc_unmasked`` (DKVB only, NaN otherwise): forget-test accuracy with the key mask
  removed.

What the probe measures for DKVB. The probe fine-tunes the trainable tensors (the values and the
decoder) of the *masked* model, and the masked keys stay masked: their values can neither be
selected nor updated, so the probe measures how fast the remaining keys can be taught the forget
classes. The masked keys' values still hold what the model learned about those classes; anyone
who can edit the key mask gets them back at once, which ``forget_test_acc_unmasked`` shows. Key
masking is forgetting towards users of the served model, not towards holders of its weights.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .selection import Candidates
from .data import EmbeddingSet
from .evaluate import accuracy, evaluate, predict_logits
from .validate import require

VERIFY_COLUMNS = (
    "forget_train_acc", "forget_test_acc", "retain_test_acc", "mia", "mia_retrain",
    "relearn_steps", "relearn_steps_retrain", "relearn_target_acc", "forget_test_acc_unmasked",
)


@dataclass
class ProbeConfig:
    """The relearning probe.

    Attributes:
        examples: forget-train examples fine-tuned on (a seeded draw across the forget classes).
        lr: SGD learning rate (fixed, no momentum); the same for every model compared.
        max_steps: give up after this many full-batch steps (the count is then ``inf``).
        target: the probe stops when forget-test accuracy reaches ``target`` times the original
            model's forget-test accuracy.
        seed: seeds the draw of examples.
    """

    examples: int = 10
    lr: float = 1.0
    max_steps: int = 200
    target: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.examples >= 1, "ProbeConfig", "examples", ">= 1", self.examples)
        require(self.lr > 0, "ProbeConfig", "lr", "> 0", self.lr)
        require(self.max_steps >= 1, "ProbeConfig", "max_steps", ">= 1", self.max_steps)
        require(0 < self.target <= 1, "ProbeConfig", "target", "in (0, 1]", self.target)


def relearn_steps(model: nn.Module, probe: EmbeddingSet, forget_test: EmbeddingSet, target_acc: float, *,
                  lr: float, max_steps: int, test_candidates: Candidates | None = None) -> float:
    """SGD steps on ``probe`` until forget-test accuracy >= ``target_acc`` (0 if already; ``inf`` if
    not within ``max_steps``). Fine-tunes a copy's trainable parameters; buffers such as the key
    mask are left as they are, so a DKVB's keys are looked up once for the whole probe, or picked
    from ``test_candidates`` (``bottleneck.candidates(forget_test.x)`` on a model sharing its keys)."""
    if len(probe) == 0 or len(forget_test) == 0:
        return float("nan")
    m = copy.deepcopy(model)
    params = m.trainable_parameters() if hasattr(m, "trainable_parameters") else list(m.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    if hasattr(m, "bottleneck"):  # keys and mask are fixed during the probe: search once
        b = m.bottleneck
        test_in = b.lookup(forget_test.x) if test_candidates is None else b.select(forget_test.x, test_candidates)
        probe_in, forward = b.lookup(probe.x), m.decode
    else:
        probe_in, test_in, forward = probe.x, forget_test.x, m

    def reached() -> bool:
        m.eval()
        with torch.no_grad():
            return accuracy(forward(test_in), forget_test.y) >= target_acc

    if reached():
        return 0.0
    for step in range(1, max_steps + 1):
        m.train()
        loss = F.cross_entropy(forward(probe_in), probe.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if reached():
            return float(step)
    return math.inf


def probe_relearning(model: nn.Module, train: EmbeddingSet, test: EmbeddingSet, forget_classes: Sequence[int],
                     target_acc: float, probe: ProbeConfig | None = None,
                     test_candidates: Candidates | None = None) -> float:
    """The relearning probe of ``model``: :func:`relearn_steps` on ``probe.examples`` seeded
    forget-train examples until forget-test accuracy reaches ``target_acc`` (``test_candidates``:
    a DKVB's kept candidates of the whole test set, from a model sharing its keys)."""
    probe = probe or ProbeConfig()
    few, forget_test = probe_sets(train, test, forget_classes, probe)
    if test_candidates is not None:
        rows = test.class_mask(sorted(set(int(c) for c in forget_classes)))
        test_candidates = Candidates(test_candidates.indices[rows], test_candidates.mask)
    return relearn_steps(model, few, forget_test, target_acc, lr=probe.lr, max_steps=probe.max_steps,
                         test_candidates=test_candidates)


def probe_sets(train: EmbeddingSet, test: EmbeddingSet, forget_classes: Sequence[int],
               probe: ProbeConfig) -> tuple[EmbeddingSet, EmbeddingSet]:
    """(the ``probe.examples`` seeded forget-train examples, the forget-test set) of the probe.

    The examples are drawn by position among the forget-train rows, so only those rows and the
    forget-test rows are copied (not the retain sets).
    """
    classes = sorted(set(int(c) for c in forget_classes))
    forget_rows = train.class_mask(classes).nonzero().flatten()
    g = torch.Generator().manual_seed(probe.seed)
    few = train.subset(forget_rows[torch.randperm(len(forget_rows), generator=g)[: probe.examples]])
    return few, test.subset(test.class_mask(classes))


def unmasked_accuracy(model: nn.Module, data: EmbeddingSet) -> float:
    """Accuracy of a DKVB model on ``data`` with its key mask cleared (NaN for other models)."""
    if not hasattr(model, "bottleneck"):
        return float("nan")
    m = copy.deepcopy(model)
    m.bottleneck.key_mask.zero_()
    return accuracy(predict_logits(m, data.x), data.y)


def retrain_reference(original: nn.Module, train: EmbeddingSet, forget_classes: Sequence[int], *,
                      seed: int = 0, **params: Any) -> nn.Module:
    """The exact-unlearning reference: the ``retrain`` unlearner (fresh init, retain set only)."""
    from .unlearn import ForgetRequest, create_unlearner

    return create_unlearner("retrain", **params).unlearn(original, ForgetRequest(tuple(forget_classes), train,
                                                                                  seed=seed)).model


def verify(
    unlearned: nn.Module,
    original: nn.Module,
    train: EmbeddingSet,
    test: EmbeddingSet,
    forget_classes: Sequence[int],
    *,
    retrained: nn.Module | None = None,
    retrain_params: dict[str, Any] | None = None,
    probe: ProbeConfig | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """The :data:`VERIFY_COLUMNS` of ``unlearned`` (see the module docstring).

    Args:
        original: the model before unlearning (sets the probe's target accuracy).
        retrained: the retrain-from-scratch reference; ``None`` trains one from ``original`` with
            the ``retrain`` unlearner and ``retrain_params``.
        probe: relearning-probe settings.
    """
    probe = probe or ProbeConfig()
    classes = sorted(set(int(c) for c in forget_classes))
    if retrained is None:
        retrained = retrain_reference(original, train, classes, seed=seed, **(retrain_params or {}))
    forget_test, _ = test.split(classes)
    ours = evaluate(unlearned, train, test, classes, seed=seed)
    ref = evaluate(retrained, train, test, classes, seed=seed)
    target = probe.target * accuracy(predict_logits(original, forget_test.x), forget_test.y)
    steps = {name: probe_relearning(m, train, test, classes, target, probe)
             for name, m in (("ours", unlearned), ("retrain", retrained))}
    return {
        "forget_train_acc": ours["forget_train_acc"],
        "forget_test_acc": ours["forget_test_acc"],
        "retain_test_acc": ours["retain_test_acc"],
        "mia": ours["mia"],
        "mia_retrain": ref["mia"],
        "relearn_steps": steps["ours"],
        "relearn_steps_retrain": steps["retrain"],
        "relearn_target_acc": target,
        "forget_test_acc_unmasked": unmasked_accuracy(unlearned, forget_test),
    }


def format_columns(row: dict[str, float]) -> str:
    """The columns as ``name  value`` lines: accuracies and MIA in percent, steps as integers."""
    lines = []
    for name in VERIFY_COLUMNS:
        v = row.get(name, float("nan"))
        if name.startswith("relearn_steps"):
            text = "not reached" if v == math.inf else ("n/a" if math.isnan(v) else f"{int(v)}")
        else:
            text = "n/a" if math.isnan(v) else f"{100 * v:6.2f}%"
        lines.append(f"{name:26s} {text}")
    return "\n".join(lines)


__all__ = ["verify", "relearn_steps", "retrain_reference", "unmasked_accuracy", "ProbeConfig", "VERIFY_COLUMNS",
           "format_columns"]
