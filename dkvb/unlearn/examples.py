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
from .base import ForgetRequest, Unlearner, register
from .masking import check_selectable, mask_summary, masked_copy


@register("dkvb-examples")
@dataclass
class UnlearnViaExamples(Unlearner):
    """Mask the keys selected by ``num_examples`` forget examples.

    Attributes:
        num_examples: N_E, forget-class training examples drawn (seeded by the request);
            ``None`` uses all of them.
        rounds: repeat the lookup with the keys masked so far, so the examples' next-nearest
            keys are masked too (1 = the paper's single pass).
        erase_values: also zero the masked keys' values, so the weights no longer hold them.
    """

    num_examples: int | None = 10
    rounds: int = 1
    erase_values: bool = False

    model_kind = "dkvb"

    def __post_init__(self) -> None:
        if self.num_examples is not None:
            require_count(self.name, "num_examples", self.num_examples)
        require_count(self.name, "rounds", self.rounds)

    def _unlearn(self, model: DKVBClassifier, request: ForgetRequest) -> tuple[DKVBClassifier, int, dict[str, Any]]:
        forget = request.forget
        n = len(forget) if self.num_examples is None else min(self.num_examples, len(forget))
        g = torch.Generator().manual_seed(request.seed)
        x = forget.x[torch.randperm(len(forget), generator=g)[:n]]
        out = masked_copy(model, torch.zeros_like(model.key_mask))
        b = out.bottleneck
        flops = 0
        for _ in range(self.rounds):
            idx = b.lookup(x)  # (n, C, topk)
            flops += lookup_flops(out, n)
            note_images(n)
            hit = torch.zeros(b.num_codebooks * b.codebook_size, dtype=torch.bool)
            offsets = (torch.arange(b.num_codebooks) * b.codebook_size).view(1, -1, 1)
            hit[(idx.cpu() + offsets).flatten()] = True
            mask = b.key_mask | hit.view_as(b.key_mask).to(b.key_mask.device)
            check_selectable(mask, b.topk)
            b.key_mask = mask
        new_mask = b.key_mask & ~model.key_mask
        if self.erase_values:
            with torch.no_grad():
                b.values[new_mask] = 0.0
        return out, flops, {"num_examples": n, **mask_summary(new_mask), "mask": new_mask}
