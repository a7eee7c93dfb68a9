"""Retention-Based Masking (RBM), Ding et al., "Understanding Fine-tuning in Approximate
Unlearning: A Theoretical Perspective" (TMLR 2025, arXiv 2410.03833).

The paper shows that fine-tuning on the retain set keeps the components of the pretrained
weights that only the forget data use, and proposes a weight-saliency mask built from the
*remaining* (retain) data instead of the forget data (as SalUn does), which removes those
components while keeping the features the forget and retain data share. We found neither the
authors' code nor the exact rule, so the rule below is OUR READING of the paper (unconfirmed):

1. saliency of a weight = |sum over retain mini-batches of d CE / d weight| at the original
   weights (SalUn's saliency formula, computed on the retain set instead of the forget set);
2. keep the ``1 - sparsity`` fraction of weights with the HIGHEST retain saliency (the weights
   the retained classes rely on) and set the others to zero (they hold what only the forget
   data need);
3. fine-tune only the kept weights on the retain set (the :class:`~dkvb.unlearn.finetune.Finetune`
   recipe); the zeroed weights stay zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..flops import FlopCounter
from ..validate import require
from .base import ForgetRequest, register
from .finetune import Finetune
from .gradient import accumulate_gradients, top_fraction_mask


@register("rbm")
@dataclass
class RetentionBasedMasking(Finetune):
    """Zero the weights the retain set is least sensitive to, then fine-tune the rest on the retain set
    (rule: our reading, see the module docstring).

    FLOPs: one forward + backward pass per retain mini-batch for the saliency, plus the
    fine-tuning steps; zeroing is counted as one FLOP per weight.

    Attributes:
        sparsity: fraction of trainable weights zeroed and frozen, in [0, 1) (default 0.5, the
            issue's choice; SalUn's default mask also splits the weights 50/50).
        epochs, lr, optimizer, momentum, weight_decay, batch_size: the fine-tuning recipe, same
            defaults as ``finetune`` (SalUn repository's FT; the RBM paper's values are unknown to us).
    """

    sparsity: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.sparsity < 1, self.name, "sparsity", "in [0, 1)", self.sparsity)

    def prepare(self, model: nn.Module, request: ForgetRequest, flops: FlopCounter) -> tuple[list[Tensor], dict]:
        grads, _ = accumulate_gradients(model, request.retain, method=self.name, batch_size=self.batch_size,
                                        flops=flops)
        mask = top_fraction_mask([g.abs() for g in grads], 1 - self.sparsity, largest=True)
        with torch.no_grad():
            for p, m in zip(model.trainable_parameters(), mask):
                p.mul_(m)
                flops.add(p.numel())
        return mask, {}
