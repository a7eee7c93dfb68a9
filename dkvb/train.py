"""Training of values/decoder (DKVB) or the linear head on cached embeddings."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import EmbeddingSet
from .flops import FlopCounter


@dataclass
class TrainConfig:
    """Optimisation of the trainable parts (values + decoder, or the linear head).

    Attributes:
        epochs: passes over the training embeddings.
        lr: Adam learning rate.
        batch_size: embeddings per step.
        weight_decay: Adam weight decay.
        seed: seeds the shuffling (and nothing else: keys are seeded by the model).
    """

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class DivergenceError(RuntimeError):
    """A loss became NaN or infinite; the model being trained must be discarded."""


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[Tensor]:
    """Index batches over ``range(n)``: shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def fit(
    model: nn.Module,
    data: EmbeddingSet,
    config: TrainConfig,
    *,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
    flops: FlopCounter | None = None,
    progress: bool = False,
    desc: str = "train",
) -> nn.Module:
    """Minimise ``loss_fn`` (default cross-entropy) over ``data``; initialises keys first if needed.

    Raises :class:`DivergenceError` on a non-finite loss.
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty embedding set")
    bottleneck = getattr(model, "bottleneck", None)
    if bottleneck is not None and not bool(bottleneck.initted):
        model.prepare(data.x)
    # Keys and mask are frozen while values train, so a DKVB's nearest keys never change:
    # look them up once and train on the cached indices (the lookup is counted once).
    indices = None
    if bottleneck is not None and loss_fn is None:
        indices = bottleneck.lookup(data.x)
        if flops is not None:
            from .unlearn.masking import lookup_flops

            flops.add(lookup_flops(model, len(data)))
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y))
    params = model.trainable_parameters()
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator().manual_seed(config.seed)
    model.train()
    steps = config.epochs * math.ceil(len(data) / config.batch_size)
    bar = tqdm(total=steps, desc=desc, disable=not progress, unit="step", leave=False)
    for _ in range(config.epochs):
        for idx in batches(len(data), config.batch_size, g):
            x, y = data.x[idx], data.y[idx]
            if indices is not None:
                values = bottleneck.get_output_from_indices(indices[idx])
                loss = F.cross_entropy(model.decoder(values), y)
            else:
                loss = loss_fn(model, x, y)
            if not torch.isfinite(loss):
                raise DivergenceError(f"{desc}: loss became {loss.item()} — training diverged")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if flops is not None:
                if indices is not None:
                    flops.step(model.decoder, values)
                else:
                    flops.step(model, x)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return model
