"""Potion, Schoepf, Foster & Brintrup, "Potion: Towards Poison Unlearning" (arXiv 2406.09173,
JDMDH 2024), followed by fine-tuning on the retain set.

Potion is SSD (:mod:`dkvb.unlearn.ssd`) with its selection strength found by search instead of
set by hand: the selection threshold ``alpha`` is the ``100 - log(1 + 100 * s)`` percentile of
the importance ratios ``I_Df / I_D`` over all weights, with the share ``s`` starting at
``|D_f| / |D| / 25`` and multiplied by 1.1 after every try, each try starting again from the
original weights, until the forget set's accuracy is at most ``rho`` times the original's (the
``ASSD`` class with ``ITERATIVE_SEARCH`` in ``src/methods.py`` / ``assd_tuning`` in
``src/utils.py`` of if-loops/towards_poison_unlearning; dampening constant 1, importances
computed once). The retain-set fine-tuning afterwards is :class:`~dkvb.unlearn.finetune.Finetune`
(that repository's ``ASSDR`` variant repairs the same way, with its own epoch count).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..flops import FlopCounter
from ..validate import require, require_count
from .base import ForgetRequest, register
from .finetune import Finetune
from .ssd import dampen, ssd_importances


def forget_accuracy(model: nn.Module, x: Tensor, y: Tensor, flops: FlopCounter) -> float:
    """Accuracy of ``model`` on (x, y), counted as one forward pass."""
    flops.forward(model, x)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


DAMPENING = 1.0  # Potion's dampening constant (lambda of SSD)


@register("potion")
@dataclass
class Potion(Finetune):
    """Potion's search for SSD's selection strength, then fine-tuning on the retain set.

    FLOPs: the importance passes (forward + backward per mini-batch of the forget set and of
    the full training set), per try one forward pass over the forget set, one comparison per
    importance ratio for the percentile and SSD's 3 FLOPs per weight, then the fine-tuning steps.

    Attributes:
        rho: stop once the forget-train accuracy is at most ``rho`` x the original's (the
            repository's ``p_cut``, swept over 0-0.75 there; default 0.05 is ours: the
            forget class must be forgotten, not merely weakened).
        step: factor on the share ``s`` after a failed try (1.1, ``STEP_MULT``).
        max_tries: give up the search after this many tries and keep the last (500, ``MAX_TRY``).
            The search also ends at the first try with ``alpha <= 1`` (the dampening constant):
            from there every weight with ``I_Df > I_D`` is dampened and every further selected
            weight is multiplied by ``min(I_D / I_Df, 1) = 1``, so every later try gives the same
            weights as this one and would fail the same way (``saturated`` in the details; the
            repository runs the remaining tries, ending with the same model).
        share: the initial ``s``; ``None``: ``|D_f| / |D| / 25`` (repository).
        importance_batch_size: mini-batch of the importance passes (256, ours, as ``ssd``).
        epochs, lr, optimizer, momentum, weight_decay, batch_size: the retain fine-tuning,
            ``finetune``'s defaults (SalUn repository's FT).
    """

    rho: float = 0.05
    step: float = 1.1
    max_tries: int = 500
    share: float | None = None
    importance_batch_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.rho < 1, self.name, "rho", "in [0, 1)", self.rho)
        require(self.step > 1, self.name, "step", "> 1", self.step)
        require_count(self.name, "max_tries", self.max_tries)
        require(self.share is None or 0 < self.share, self.name, "share", "> 0 or None", self.share)
        require_count(self.name, "importance_batch_size", self.importance_batch_size)

    def prepare(self, model: nn.Module, request: ForgetRequest,
                flops: FlopCounter) -> tuple[None, dict[str, Any]]:
        """Potion's search, in place on ``model``; every weight stays trainable for the fine-tuning."""
        imp_f, imp_d = ssd_importances(model, request, batch_size=self.importance_batch_size, flops=flops,
                                       method=self.name)
        ratios = torch.cat([(f / d).flatten() for f, d in zip(imp_f, imp_d)])
        ratios = ratios[torch.isfinite(ratios)].double().cpu().numpy()
        if not len(ratios):
            raise ValueError(f"{self.name}: no weight has a finite importance ratio I_Df / I_D")
        params = model.trainable_parameters()
        original = [p.detach().clone() for p in params]
        x, y = request.forget.x, request.forget.y
        target = self.rho * forget_accuracy(model, x, y, flops)
        share = self.share if self.share is not None else len(request.forget) / len(request.train) / 25
        for tries in range(1, self.max_tries + 1):
            percentile = max(0.0, 100 - math.log(1 + 100 * share))
            alpha = float(np.percentile(ratios, percentile))  # the repository's np.nanpercentile, NaN/inf removed
            flops.add(len(ratios))
            with torch.no_grad():
                for p, o in zip(params, original):
                    p.copy_(o)
            selected = dampen(model, imp_f, imp_d, alpha=alpha, dampening=DAMPENING, flops=flops)
            accuracy = forget_accuracy(model, x, y, flops)
            if accuracy <= target or alpha <= DAMPENING:
                break
            share *= self.step
        return None, {"tries": tries, "alpha": alpha, "percentile": percentile, "forget_train_acc_before_ft": accuracy,
                      "forgotten": accuracy <= target, "saturated": accuracy > target and alpha <= DAMPENING,
                      "weights_dampened": sum(int(s.sum()) for s in selected)}
