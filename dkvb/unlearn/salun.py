"""SalUn, Fan et al. (ICLR 2024): random-label fine-tuning restricted to forget-salient weights."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..flops import FlopCounter
from ..train import batches
from ..validate import require
from .base import ForgetRequest, register
from .gradient import GradientUnlearner, accumulate_gradients, cross_entropy, mask_details, top_fraction_mask


@register("salun")
@dataclass
class SalUn(GradientUnlearner):
    """Mask the weights most salient for the forget loss, then fine-tune them on forget examples
    with random labels mixed with the retain set.

    Saliency, as ``Classification/generate_mask.py`` of OPTML-Group/Unlearn-Saliency: the
    absolute value of the gradient of the forget-set loss summed over forget mini-batches,
    ranked globally across all parameters; the top fraction is updated. Each epoch is one
    shuffled pass over the concatenation of the relabelled forget set and the retain set
    (class-wise random labelling); the random labels are redrawn every epoch from the *retain*
    classes (seeded by the request), so a forget example is never "relabelled" with its own
    class. Only the masked weights change (the others are restored after every step, so weight
    decay and momentum leave them alone too: stricter than the repo, which masks the gradient).

    FLOPs: one forward + backward pass per forget mini-batch for the saliency, then the steps.

    Attributes:
        sparsity: fraction of weights left untouched, in [0, 1) (default 0.5: the README's
            ``with_0.5.pt`` mask, which updates the top 50%).
        epochs: passes (default 10, repo ``--unlearn_epochs``).
        lr: learning rate (default 0.01, repo ``--unlearn_lr`` default; its README's CIFAR-10
            commands pass other values).
        optimizer, momentum, weight_decay, batch_size: SGD, 0.9, 5e-4, 256 (repo defaults).
    """

    epochs: int = 10
    sparsity: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.sparsity < 1, self.name, "sparsity", "in [0, 1)", self.sparsity)

    def _unlearn(self, model: nn.Module, request: ForgetRequest) -> tuple[nn.Module, int, dict[str, Any]]:
        out, flops = copy.deepcopy(model), FlopCounter()
        forget, retain = request.forget, request.retain
        grads, _ = accumulate_gradients(out, forget, method=self.name, batch_size=self.batch_size, flops=flops,
                                        loss_fn=lambda m, x, y: -F.cross_entropy(m(x), y))
        mask = top_fraction_mask([g.abs() for g in grads], 1 - self.sparsity, largest=True)
        loop = self.loop(out, mask, flops)
        g = torch.Generator().manual_seed(request.seed)
        retain_classes = retain.y.unique()
        x = torch.cat([forget.x, retain.x])
        for _ in range(self.epochs):
            random_labels = retain_classes[torch.randint(len(retain_classes), (len(forget),), generator=g)]
            y = torch.cat([random_labels, retain.y])
            for idx in batches(len(x), self.batch_size, g):
                xb = x.index_select(0, idx)
                loop.step(cross_entropy(out, xb, y.index_select(0, idx)), xb)
        out, total = loop.finish()
        return out, total, {"steps": loop.steps, **mask_details(mask)}
