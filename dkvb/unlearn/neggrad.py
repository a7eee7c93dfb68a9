"""NegGrad+ (as named by Kurmanji et al., NeurIPS 2023): descend on the retain set while ascending
on the forget set, in the same step."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..validate import require, require_count
from .base import ForgetRequest, register
from .gradient import GradientUnlearner, cross_entropy, paired_batches


@register("neggrad")
@dataclass
class NegGradPlus(GradientUnlearner):
    """Per step: ``loss = alpha * CE(retain batch) - (1 - alpha) * CE(forget batch)``.

    This is the "gradient ascent + retain fine-tuning" recipe (Ascent+CF): Kurmanji et al.
    define NegGrad+ as NegGrad (ascent on the forget set) combined with fine-tuning on the
    retain set, weighted by ``alpha``. Both happen in every step (``alpha = 1`` is plain
    fine-tuning); a variant that first ascends and then fine-tunes, in two phases, is not
    offered separately.

    One epoch is one shuffled pass over the retain set; the (smaller) forget set is cycled
    alongside, reshuffled after every pass (both seeded by the request). Each step counts a
    forward + backward pass on both batches.

    Defaults: there is no official default for ``alpha``; 0.999 is the value used in public
    forks/re-implementations of SCRUB's NegGrad+ baseline (ours to confirm). The optimiser
    settings are the SGD settings the SCRUB and SalUn repositories use for their baselines.

    Attributes:
        alpha: weight of the retain loss, in (0, 1] (default 0.999, forks' value; 1 = fine-tuning).
        epochs: passes over the retain set (default 5, ours).
        lr: learning rate (default 0.01, SGD baselines of the SCRUB/SalUn repositories).
        optimizer, momentum, weight_decay: SGD, 0.9, 5e-4 (same repositories).
        batch_size: retain examples per step (default 256).
        forget_batch_size: forget examples per step (default 256, ours).
    """

    alpha: float = 0.999
    forget_batch_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.alpha <= 1, self.name, "alpha", "in (0, 1]", self.alpha)
        require_count(self.name, "forget_batch_size", self.forget_batch_size)

    def _unlearn(self, model: nn.Module, request: ForgetRequest) -> tuple[nn.Module, int, dict[str, Any]]:
        loop = self.loop(copy.deepcopy(model))
        out, forget, retain = loop.model, request.forget, request.retain
        g = torch.Generator().manual_seed(request.seed)
        for _ in range(self.epochs):
            for r, f in paired_batches(len(retain), len(forget), self.batch_size, self.forget_batch_size, g):
                xr, xf = retain.x.index_select(0, r), forget.x.index_select(0, f)
                loss = (self.alpha * cross_entropy(out, xr, retain.y.index_select(0, r))
                        - (1 - self.alpha) * cross_entropy(out, xf, forget.y.index_select(0, f)))
                loop.step(loss, xr, xf)
        out, total = loop.finish()
        return out, total, {"steps": loop.steps}
