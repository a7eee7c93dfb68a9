"""Deleting the forgotten classes' outputs: the one-line baseline every unlearning method must beat.

The class can no longer be predicted because its logit is pinned far below every other, not
because anything the model learned about it was removed. No data is read and about no compute
is spent, so forget accuracy alone cannot tell it from real unlearning; the forgetting-quality
benchmark (:mod:`dkvb.forgetting_eval`) can.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models import DKVBClassifier, LinearHead, MeanDecoder
from .base import ForgetRequest, Unlearner, register
from .masking import frozen_shared_copy

# The logit a deleted output is pinned to: exp(-1e4) is 0 in float32, so the class gets no
# probability, while every loss and score stays finite.
DELETED_LOGIT = -1e4


@register("drop-output")
@dataclass
class DropOutput(Unlearner):
    """Pin the forget classes' logits to :data:`DELETED_LOGIT` (a linear head: the class's weight
    row zeroed and its bias set; a DKVB with the mean decoder: the class's score at every key, and
    its share of the value start removed; an MLP decoder: its last layer's row). FLOPs: one write
    per changed weight."""

    def _unlearn(self, model: nn.Module, request: ForgetRequest) -> tuple[nn.Module, int, dict[str, Any]]:
        cols = list(request.forget_classes)
        out = frozen_shared_copy(model) if isinstance(model, DKVBClassifier) else copy.deepcopy(model)
        with torch.no_grad():
            if isinstance(out, LinearHead):
                out.fc.weight[cols] = 0.0
                out.fc.bias[cols] = DELETED_LOGIT
                changed = len(cols) * (out.input_dim + 1)
            elif isinstance(out, DKVBClassifier) and isinstance(out.decoder, MeanDecoder):
                b = out.bottleneck
                b.corrections.fold_into(b.values)
                b.values[..., cols] = DELETED_LOGIT
                b.start.drop_classes(cols)
                changed = b.num_codebooks * b.codebook_size * len(cols)
            elif isinstance(out, DKVBClassifier):
                last = out.decoder.net[-1]
                last.weight[cols] = 0.0
                last.bias[cols] = DELETED_LOGIT
                changed = len(cols) * (last.in_features + 1)
            else:
                raise TypeError(f"{self.name} acts on a linear head or a DKVB, got {type(model).__name__}")
        return out, changed, {}
