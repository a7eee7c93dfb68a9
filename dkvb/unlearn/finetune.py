"""Fine-tuning on the retain set only ("FT" / catastrophic forgetting baseline)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..flops import FlopCounter
from ..train import batches
from .base import ForgetRequest, register
from .gradient import GradientUnlearner, cross_entropy, mask_details


@register("finetune")
@dataclass
class Finetune(GradientUnlearner):
    """Continue training the model on the retain set, hoping the forget classes fade.

    Each epoch is one shuffled pass over the retain set (seeded by the request) with
    cross-entropy. Source of the defaults: the "FT" baseline as run in SalUn's repository
    (OPTML-Group/Unlearn-Saliency, ``Classification/arg_parser.py``: SGD, momentum 0.9, weight
    decay 5e-4, batch 256, ``--unlearn_lr 0.01``, ``--unlearn_epochs 10``).

    Attributes:
        epochs: passes over the retain set (default 10, SalUn repo).
        lr: learning rate (default 0.01, SalUn repo).
        optimizer: ``"sgd"`` (default, SalUn repo) or ``"adam"``.
        momentum: SGD momentum (default 0.9, SalUn repo).
        weight_decay: default 5e-4 (SalUn repo).
        batch_size: default 256 (SalUn repo).
    """

    epochs: int = 10
    lr: float = 1e-2

    def prepare(self, model: nn.Module, request: ForgetRequest,
                flops: FlopCounter) -> tuple[list[Tensor] | None, dict[str, Any]]:
        """Hook run on the copy before fine-tuning; returns the mask of weights the steps may change
        (``None``: every trainable weight) and details for the report. Plain fine-tuning changes
        nothing here."""
        return None, {}

    def _unlearn(self, model: nn.Module, request: ForgetRequest) -> tuple[nn.Module, int, dict[str, Any]]:
        out, flops = copy.deepcopy(model), FlopCounter()
        mask, details = self.prepare(out, request, flops)
        loop = self.loop(out, mask, flops)
        retain = request.retain
        g = torch.Generator().manual_seed(request.seed)
        for _ in range(self.epochs):
            for idx in batches(len(retain), self.batch_size, g):
                x = retain.x.index_select(0, idx)
                loop.step(cross_entropy(out, x, retain.y.index_select(0, idx)), x)
        out, total = loop.finish()
        return out, total, {**details, "steps": loop.steps, **(mask_details(mask) if mask is not None else {})}
