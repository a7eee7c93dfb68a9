"""Retraining from scratch on the retain set: the exact-unlearning reference every method is compared to."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..flops import FlopCounter
from ..models import build_model
from ..train import TrainConfig, fit
from .base import ForgetRequest, Unlearner, register
from .gradient import check_parameters, require, require_count


def seeded_build(config: dict, input_dim: int, num_classes: int, seed: int) -> nn.Module:
    """``build_model`` with the global RNG seeded too, so modules that draw from it (the MLP
    decoder's default init) come out the same every time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(config, input_dim, num_classes, seed=seed)


def fresh_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose trainable parameters are back at their initial values.

    The initial values come from :func:`seeded_build` with the model's own seed, so a linear head
    restarts exactly where the original training started. Frozen state is kept: a DKVB copy
    keeps its keys, projection and key mask (the keys were fitted by k-means on unlabelled
    embeddings of the full training set) and drops its cached activation counts, which were
    counted on data that included the forget classes.
    """
    init = seeded_build(model.config, model.input_dim, model.num_classes, int(model.config.get("seed", 0)))
    out = copy.deepcopy(model)
    init_params = dict(init.named_parameters())
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.requires_grad:
                p.copy_(init_params[name])
    if hasattr(out, "activation_counts"):
        out.activation_counts = torch.zeros(0, dtype=torch.long, device=out.activation_counts.device)
    return out


@register("retrain")
@dataclass
class Retrain(Unlearner):
    """Train a freshly initialised model of the same config on the retain set only.

    The copy restarts from the original model's own initial weights (same architecture, same
    seed, see :func:`fresh_copy`) and is trained with :func:`dkvb.train.fit` (Adam,
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
