"""Machinery shared by the gradient-based baselines.

Every gradient method works on a deep copy of the model and runs its steps through one
:class:`GradientLoop`: an optimiser over ``model.trainable_parameters()`` whose steps

- raise :class:`~dkvb.train.DivergenceError` naming the method when a loss (or, at the end,
  a parameter) is NaN or infinite, so the caller's model is never half-updated;
- optionally update only the entries of a saliency mask (the other entries are restored
  after every step, so momentum and weight decay cannot move them either);
- count forward + backward FLOPs of every batch through :class:`~dkvb.flops.FlopCounter`.

FLOPs: fvcore counts one forward pass of the model on the batch (one multiply-add = one FLOP);
a gradient step adds the backward pass as ``dkvb.flops.BACKWARD_FACTOR`` (= 2) times that
forward, so a step costs 3 forwards (:func:`~dkvb.flops.train_step_flops`). A loss that runs
the model on two batches (NegGrad+'s retain and forget batch) counts a step for each; a frozen
teacher's forward (SCRUB) counts as a forward only. Optimiser arithmetic is not counted.

Batches come from :func:`~dkvb.train.batches`, :func:`cycle_batches` (an endless, reshuffled
stream for the smaller forget set) and :func:`paired_batches` (one pass over the retain set,
the forget set cycled alongside). :func:`accumulate_gradients` and :func:`top_fraction_mask`
build the weight saliencies of SalUn, RBM and SSD.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import EmbeddingSet
from ..flops import FlopCounter
from ..train import DivergenceError, batches, check_parameters
from ..validate import require, require_choice, require_count
from .base import Unlearner

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, momentum, weight_decay: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay),
    "adam": lambda params, lr, momentum, weight_decay: torch.optim.Adam(
        params, lr=lr, weight_decay=weight_decay),
}

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def check_finite(loss: Tensor, method: str, step: int, *, what: str = "loss") -> None:
    """DivergenceError naming ``method`` and ``step`` unless ``loss`` is finite."""
    if not bool(torch.isfinite(loss)):
        raise DivergenceError(
            f"{method}: {what} became {loss.item()} at step {step} — unlearning diverged (try a smaller lr); "
            "the input model is unchanged"
        )


def cycle_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled index batches over ``range(n)``, reshuffled after every pass."""
    while True:
        yield from batches(n, batch_size, generator)


def paired_batches(
    n: int, m: int, batch_size: int, other_batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """One shuffled pass over ``range(n)``, each batch paired with a batch of the cycled ``range(m)``."""
    return zip(batches(n, batch_size, generator), cycle_batches(m, other_batch_size, generator))


class GradientLoop:
    """Guarded, optionally masked, FLOP-counted optimiser steps on ``model`` (already a copy).

    Args:
        model: the model to update in place (the caller's deep copy).
        method: name used in divergence messages.
        optimizer: a key of :data:`OPTIMIZERS`.
        lr, momentum, weight_decay: optimiser settings (``momentum`` is ignored by Adam).
        mask: boolean tensors shaped like ``model.trainable_parameters()``; only ``True``
            entries change. ``None`` updates every trainable entry.
        flops: counter to add to (e.g. one that already holds a saliency pass); a new one by default.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str,
        *,
        optimizer: str,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        mask: list[Tensor] | None = None,
        flops: FlopCounter | None = None,
    ) -> None:
        self.model, self.method = model, method
        self.params = model.trainable_parameters()
        if mask is not None and [m.shape for m in mask] != [p.shape for p in self.params]:
            raise ValueError(f"{method}: mask shapes do not match the trainable parameters")
        self.mask = mask
        self.anchor = [p.detach().clone() for p in self.params] if mask is not None else None
        self.opt = OPTIMIZERS[optimizer](self.params, lr, momentum, weight_decay)
        self.flops = flops if flops is not None else FlopCounter()
        self.steps = 0
        model.train()

    def step(self, loss: Tensor, *inputs: Tensor) -> None:
        """One optimiser step on ``loss``; ``inputs`` are the batches the model ran forward on."""
        check_finite(loss, self.method, self.steps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.mask is None:
            self.opt.step()
        else:
            for p, m in zip(self.params, self.mask):
                if p.grad is not None:
                    p.grad.mul_(m)
            self.opt.step()
            with torch.no_grad():
                for p, m, a in zip(self.params, self.mask, self.anchor):
                    p.copy_(torch.where(m, p, a))
        for x in inputs:
            self.flops.step(self.model, x)
        self.steps += 1

    def finish(self) -> tuple[nn.Module, int]:
        """The trained model in eval mode and the FLOPs spent; DivergenceError on non-finite weights."""
        self.opt.zero_grad(set_to_none=True)
        check_parameters(self.model, self.method, self.steps)
        self.model.eval()
        return self.model, self.flops.total


def accumulate_gradients(
    model: nn.Module,
    data: EmbeddingSet,
    *,
    method: str,
    batch_size: int,
    flops: FlopCounter,
    loss_fn: LossFn = cross_entropy,
    reduce: Literal["sum", "square"] = "sum",
) -> tuple[list[Tensor], int]:
    """Sum over mini-batches of each batch's gradient of ``loss_fn`` w.r.t. the trainable parameters.

    ``reduce`` says what is summed: the gradient itself (``"sum"``, so batches can cancel: the
    saliency of SalUn and RBM is the absolute value of that sum) or its square (``"square"``,
    SSD's diagonal-Fisher estimate once divided by the batch count). Runs on ``model`` as given,
    in eval mode and dataset order, through ``torch.autograd.grad`` (no ``.grad`` is left behind). Returns the sums and the
    number of batches; each batch counts as one forward + backward pass. A non-finite loss
    raises :class:`~dkvb.train.DivergenceError` naming ``method``.
    """
    params = model.trainable_parameters()
    sums = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.eval()
    chunks = batches(len(data), batch_size, None)
    for step, idx in enumerate(chunks):
        x = data.x.index_select(0, idx)
        loss = loss_fn(model, x, data.y.index_select(0, idx))
        check_finite(loss, method, step, what="saliency loss")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for s, g in zip(sums, grads):
            if g is not None:
                s.add_(_REDUCE[reduce](g))
        flops.step(model, x)
    model.train(was_training)
    return sums, len(chunks)


_REDUCE: dict[str, Callable[[Tensor], Tensor]] = {"sum": lambda g: g, "square": torch.square}


def top_fraction_mask(scores: list[Tensor], fraction: float, *, largest: bool = True) -> list[Tensor]:
    """Boolean masks selecting the ``fraction`` of entries with the largest (or smallest) score,
    ranked globally across all tensors (ties broken by position)."""
    flat = torch.cat([s.flatten() for s in scores])
    k = round(fraction * flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k:
        chosen[flat.topk(k, largest=largest).indices] = True
    return [c.view_as(s) for c, s in zip(chosen.split([s.numel() for s in scores]), scores)]


def mask_details(mask: list[Tensor]) -> dict[str, object]:
    """JSON-friendly summary plus the mask itself, for a method's ``details``.

    The mask is a tuple of tensors: the experiment keeps only JSON-safe details (lists, numbers,
    strings), so a tuple is left out of ``results.json`` but stays available to callers.
    """
    total = sum(m.numel() for m in mask)
    chosen = sum(int(m.sum()) for m in mask)
    return {"weights_updated": chosen, "weights_total": total, "mask": tuple(mask)}


@dataclass
class GradientUnlearner(Unlearner):
    """Optimiser hyperparameters every gradient baseline shares (abstract: not registered).

    Attributes:
        epochs: passes over the retain set.
        lr: learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 weight decay of the optimiser.
        batch_size: retain examples per step.
    """

    epochs: int = 5
    lr: float = 1e-2
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256

    def __post_init__(self) -> None:
        require_count(self.name, "epochs", self.epochs)
        require(self.lr > 0, self.name, "lr", "> 0", self.lr)
        require_choice(self.name, "optimizer", self.optimizer, OPTIMIZERS)
        require(0 <= self.momentum < 1, self.name, "momentum", "in [0, 1)", self.momentum)
        require(self.weight_decay >= 0, self.name, "weight_decay", ">= 0", self.weight_decay)
        require_count(self.name, "batch_size", self.batch_size)

    def loop(self, model: nn.Module, mask: list[Tensor] | None = None,
             flops: FlopCounter | None = None) -> GradientLoop:
        """A :class:`GradientLoop` over ``model`` with this method's optimiser settings."""
        return GradientLoop(model, self.name, optimizer=self.optimizer, lr=self.lr, momentum=self.momentum,
                            weight_decay=self.weight_decay, mask=mask, flops=flops)
