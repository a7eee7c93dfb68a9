"""Algorithm 2 of Shah et al. (TMLR 2025): unlearning via examples.

Look up a handful of forget-class examples and mask every key they select; the cost is
``num_examples`` bottleneck lookups per round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..flops import lookup_flops, note_images
from ..models import DKVBClassifier
from ..validate import require_count
from .base import ForgetRequest, register
from .masking import MaskingUnlearner, check_selectable, mask_summary


@register("dkvb-examples")
@dataclass
class UnlearnViaExamples(MaskingUnlearner):
    """Mask the keys selected by ``num_examples`` forget examples.

    Attributes:
        num_examples: N_E, forget-class training examples drawn (seeded by the request);
            ``None`` uses all of them.
        rounds: repeat the lookup with the keys masked so far, so the examples' next-nearest
            keys are masked too (1 = the paper's single pass).
        erase_values, refit_epochs, refit_lr: see :class:`~dkvb.unlearn.masking.MaskingUnlearner`.
    """

    num_examples: int | None = 10
    rounds: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_examples is not None:
            require_count(self.name, "num_examples", self.num_examples)
        require_count(self.name, "rounds", self.rounds)

    def _unlearn(self, model: DKVBClassifier, request: ForgetRequest) -> tuple[DKVBClassifier, int, dict[str, Any]]:
        forget = request.forget
        n = len(forget) if self.num_examples is None else min(self.num_examples, len(forget))
        g = torch.Generator().manual_seed(request.seed)
        x = forget.x[torch.randperm(len(forget), generator=g)[:n]]
        b = model.bottleneck
        mask, flops = model.key_mask.clone(), 0
        for r in range(self.rounds):  # each round looks up under the mask grown so far
            idx = b.nearest(x, b.topk, mask)  # (n, C, topk)
            flops += lookup_flops(model, n)
            note_images(n)
            hit = torch.zeros(b.num_codebooks * b.codebook_size, dtype=torch.bool)
            hit[b.flat_indices(idx.cpu()).flatten()] = True
            mask = mask | hit.view_as(mask).to(mask.device)
            if r + 1 < self.rounds or not self.release_keys:  # released keys serve again: no check at the end
                check_selectable(mask, b.topk)
        new_mask = mask & ~model.key_mask
        out, refit_flops, refit = self._finish(model, new_mask, request)
        masked = mask_summary(out.key_mask & ~model.key_mask)  # none with release_keys
        return out, flops + refit_flops, {"num_examples": n, **masked, "mask": new_mask, **refit}
