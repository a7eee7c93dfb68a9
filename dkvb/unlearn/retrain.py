"""Retraining from scratch on the retain set: the exact-unlearning reference every method is compared to."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..flops import FlopCounter
from ..models import fresh_copy
from ..train import TrainConfig, check_parameters, fit
from ..validate import require, require_count
from .base import ForgetRequest, Unlearner, register


@register("retrain")
@dataclass
class Retrain(Unlearner):
    """Train a freshly initialised model of the same config on the retain set only.

    The copy restarts from the original model's own initial weights (same architecture, same
    seed, see :func:`~dkvb.models.fresh_copy`) and is trained with :func:`dkvb.train.fit` (Adam,
    cross-entropy), i.e. the original training recipe. The model does not record how it was
    trained, so the recipe is given here: the defaults equal :class:`~dkvb.train.TrainConfig`'s
    (and the shipped experiment configs' ``linear_train``); pass the original values when they
    differ. Shuffling is seeded by the request.

    FLOPs: forward + backward of every training step (``fit``'s count).

    Attributes:
        epochs: passes over the retain set (default 10 = TrainConfig default).
        lr: Adam learning rate (default 1e-3 = TrainConfig default).
        batch_size: examples per step (default 256 = TrainConfig default).
        weight_decay: Adam weight decay (default 0 = TrainConfig default).
    """

    epochs: int = TrainConfig.epochs
    lr: float = TrainConfig.lr
    batch_size: int = TrainConfig.batch_size
    weight_decay: float = TrainConfig.weight_decay

    def __post_init__(self) -> None:
        require_count(self.name, "epochs", self.epochs)
        require(self.lr > 0, self.name, "lr", "> 0", self.lr)
        require_count(self.name, "batch_size", self.batch_size)
        require(self.weight_decay >= 0, self.name, "weight_decay", ">= 0", self.weight_decay)

    def _unlearn(self, model: nn.Module, request: ForgetRequest) -> tuple[nn.Module, int, dict[str, Any]]:
        out = fresh_copy(model)
        flops = FlopCounter()
        config = TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                             weight_decay=self.weight_decay, seed=request.seed)
        fit(out, request.retain, config, flops=flops, desc=self.name)
        check_parameters(out, self.name, self.epochs * math.ceil(len(request.retain) / self.batch_size))
        return out, flops.total, {"retain_examples": len(request.retain)}
