"""Algorithm 1 of Shah et al. (TMLR 2025): unlearning via activations.

Count, for every key, how often the training embeddings of each class select it; mask the
keys the forget class selects most. The counts are computed once per model and cached on it
(``model.activation_counts``), so every later request costs a few tensor reductions over the
C x K count table and no forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data import EmbeddingSet
from ..models import DKVBClassifier
from .base import ForgetRequest, Unlearner, check_range, register
from .masking import lookup_flops, mask_summary, masked_copy


@register("dkvb-activations")
@dataclass
class UnlearnViaActivations(Unlearner):
    """Mask keys by their activation counts on the forget classes' training embeddings.

    Attributes:
        num_keys: N_A, the number of most-activated keys to mask per codebook; ``None`` masks
            every key the forget classes activate at least ``min_count`` times.
        min_share: only keys whose activations come from the forget classes for at least this
            share (0..1) are eligible; 0 masks every key the forget classes touch, shared keys too.
            ``None`` (default) uses the forget classes' share of a uniform class mix,
            ``len(forget_classes) / num_classes``: a key is masked when the forget classes are
            over-represented on it. Measured on Fashion-MNIST, CIFAR-10 and CIFAR-100 (64-px
            EfficientNet-Lite0): forget-test accuracy <= 0.22% on average; 1.25-1.5x that share
            costs the CIFARs far less retain accuracy but forgets less on Fashion-MNIST
            (``benchmarks/share_sweep.py``, README).
        min_count: a key must be activated this many times by the forget classes to be eligible.
        use_cached_counts: use (and fill) the per-class count table cached on the model, so a
            request costs no lookup at all; ``False`` runs Algorithm 1 from scratch: look up the
            forget classes' training embeddings (all training embeddings when ``min_share > 0``).
        erase_values: also zero the masked keys' values, so the weights no longer hold them.
    """

    num_keys: int | None = None
    min_share: float | None = None
    min_count: int = 1
    use_cached_counts: bool = True
    erase_values: bool = False

    model_kind = "dkvb"

    def __post_init__(self) -> None:
        if self.num_keys is not None and self.num_keys < 1:
            raise ValueError(f"num_keys must be >= 1 or None, got {self.num_keys}")
        if self.min_share is not None:
            check_range("min_share", self.min_share, 0.0, 1.0)
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")

    def _unlearn(self, model: DKVBClassifier, request: ForgetRequest) -> tuple[DKVBClassifier, int, dict[str, Any]]:
        flops, cached = 0, self.use_cached_counts and model.activation_counts.numel() > 0
        if cached:
            counts = model.activation_counts
        elif self.use_cached_counts:
            counts = model.compute_activation_counts(request.train.x, request.train.y)
            flops += lookup_flops(model, len(request.train))
        else:
            data = request.train if self.min_share != 0 else request.forget
            counts = _unmasked_counts(model, data)
            flops += lookup_flops(model, len(data))
        forget = counts[list(request.forget_classes)].sum(0)  # (C, K)
        total = counts.sum(0)
        share = len(request.forget_classes) / counts.shape[0] if self.min_share is None else self.min_share
        eligible = (forget >= self.min_count) & (forget >= share * total)
        if self.num_keys is None:
            new_mask = eligible
        else:
            score = torch.where(eligible, forget, torch.full_like(forget, -1))
            top = score.topk(min(self.num_keys, score.shape[1]), dim=1).indices
            new_mask = torch.zeros_like(eligible).scatter_(1, top, True) & eligible
        # Reductions over the (classes, C, K) count table: one add per forget-class entry for
        # the sum, the total over all classes, and a comparison per key for the rule and top-N.
        c, k = forget.shape
        flops += (len(request.forget_classes) + counts.shape[0] + 2) * c * k
        out = masked_copy(model, new_mask, erase_values=self.erase_values)
        return out, flops, {"counts_cached": cached, **mask_summary(new_mask & ~model.key_mask),
                            "mask": new_mask}


def _unmasked_counts(model: DKVBClassifier, data: EmbeddingSet) -> torch.Tensor:
    """Per-class counts over ``data`` with no key masked, without touching the model's cache."""
    probe = masked_copy(model, torch.zeros_like(model.key_mask))
    probe.bottleneck.key_mask.zero_()
    return probe.bottleneck.activation_counts(data.x, data.y, model.num_classes)
