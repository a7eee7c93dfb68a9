"""Training of values/decoder (DKVB) or the linear head on cached embeddings."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import EmbeddingSet
from .flops import BACKWARD_FACTOR, FlopCounter, lookup_flops
from .validate import require, require_choice, require_count
from .value_init import VALUE_RIDGE, init_values


@dataclass
class TrainConfig:
    """Optimisation of the trainable parts (values + decoder, or the linear head).

    The field defaults are the generic loop's (the linear head's recipe); a DKVB trains best by
    :data:`DKVB_TRAIN`. :func:`recipe` gives each model its own, and ``fit(model, data)`` uses it.

    Attributes:
        epochs: passes over the training embeddings.
        lr: Adam learning rate.
        batch_size: embeddings per step.
        weight_decay: Adam weight decay (decoupled, on the rows a step touches, for DKVB values).
        label_smoothing: cross-entropy label smoothing (0 = none).
        value_init: how DKVB values start (mean decoder only; :mod:`dkvb.value_init`): ``"zeros"``;
            ``"counts"``, each key's value the log of its smoothed class frequencies on the
            training data (a naive-Bayes start); ``"ridge"``, a closed-form ridge regression of
            the labels on the code (with no epochs, a request solves it again without the class:
            exact unlearning); or ``"probe"``, a tuned logistic-regression probe on the embeddings
            spread over the keys (values linear in their keys), which training then refines key
            by key.
        value_ridge: the ``ridge`` start's penalty per selected key of a row.
        ridge_shards: the ``ridge`` start's shards: the values are the mean of the fits on each
            shard's rows (every class's rows dealt round-robin), so a set larger than one system
            (``RIDGE_MAX_ROWS``) still has values a request solves again exactly.
        probe_c: the probe's inverse regularisation ``C`` (``value_init="probe"``); ``None``
            chooses it on a seeded 10% holdout of the training rows.
        seed: seeds the shuffling (and nothing else: keys are seeded by the model).
    """

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    value_init: str = "zeros"
    value_ridge: float = VALUE_RIDGE
    ridge_shards: int = 1
    probe_c: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.epochs >= 0, "TrainConfig", "epochs", ">= 0", self.epochs)
        require(self.lr > 0, "TrainConfig", "lr", "> 0", self.lr)
        require(self.batch_size >= 1, "TrainConfig", "batch_size", ">= 1", self.batch_size)
        require(0 <= self.label_smoothing < 1, "TrainConfig", "label_smoothing", "in [0, 1)", self.label_smoothing)
        require_choice("TrainConfig", "value_init", self.value_init, ("zeros", "counts", "ridge", "probe"))
        require(self.value_ridge > 0, "TrainConfig", "value_ridge", "> 0", self.value_ridge)
        require_count("TrainConfig", "ridge_shards", self.ridge_shards)
        require(self.probe_c is None or self.probe_c > 0, "TrainConfig", "probe_c", "> 0 or null", self.probe_c)


# The recipes the shipped configs train with: a DKVB 30 epochs at lr 0.01 from zero values, so
# masking a class's keys is what forgets it (a probe start gains accuracy but gives every key a
# score for every class: docs/quality.md#value-init; 60 epochs gain nothing, 10 lose 0.8 on
# CIFAR-100: docs/quality.md#dkvb-train), the linear head 10 epochs at lr 1e-3.
DKVB_TRAIN = TrainConfig(epochs=30, lr=0.01, value_init="zeros")
LINEAR_TRAIN = TrainConfig(epochs=10, lr=1e-3)


def recipe(model: nn.Module) -> TrainConfig:
    """The training this toolkit measured for ``model``: :data:`DKVB_TRAIN` for a DKVB,
    :data:`LINEAR_TRAIN` otherwise."""
    return replace(DKVB_TRAIN if getattr(model, "bottleneck", None) is not None else LINEAR_TRAIN)


class DivergenceError(RuntimeError):
    """A loss became NaN or infinite; the model being trained must be discarded."""


def check_parameters(model: nn.Module, method: str, step: int) -> None:
    """DivergenceError naming ``method`` unless every trainable parameter of ``model`` is finite."""
    if not all(bool(torch.isfinite(p).all()) for p in model.trainable_parameters()):
        raise DivergenceError(
            f"{method}: parameters became NaN/inf by step {step} — unlearning diverged (try a smaller lr); "
            "the input model is unchanged"
        )


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[Tensor]:
    """Index batches over ``range(n)``: shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def fit(
    model: nn.Module,
    data: EmbeddingSet,
    config: TrainConfig | None = None,
    *,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
    flops: FlopCounter | None = None,
    progress: bool = False,
    desc: str = "train",
    indices: Tensor | None = None,
    info: dict | None = None,
) -> nn.Module:
    """Minimise ``loss_fn`` (default cross-entropy) over ``data``; initialises keys first if needed.

    ``config`` defaults to the model's :func:`recipe`.
    A DKVB with the default loss trains through :func:`fit_values` (``indices``: its nearest
    keys of ``data``, if already looked up; ``info``: receives what training chose itself, a
    probe start's C); anything else runs the generic loop (Adam on every trainable parameter).
    Raises :class:`DivergenceError` on a non-finite loss.
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty embedding set")
    config = config or recipe(model)
    bottleneck = getattr(model, "bottleneck", None)
    if bottleneck is not None and not bool(bottleneck.initted):
        model.prepare(data.x, data.y)
    if bottleneck is not None and loss_fn is None:
        return fit_values(model, data, config, flops=flops, progress=progress, desc=desc, indices=indices, info=info)
    if indices is not None:
        raise ValueError("fit: indices are a DKVB's looked-up keys, for the default loss only")
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y, label_smoothing=config.label_smoothing))
    opt = torch.optim.Adam(model.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def step(idx: Tensor) -> Tensor:
        x = data.x.index_select(0, idx)
        loss = loss_fn(model, x, data.y.index_select(0, idx))
        _check(loss, desc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if flops is not None:
            flops.step(model, x)
        return loss

    return _loop(model, len(data), config, step, progress=progress, desc=desc)


def fit_values(
    model: nn.Module,
    data: EmbeddingSet,
    config: TrainConfig,
    *,
    flops: FlopCounter | None = None,
    progress: bool = False,
    desc: str = "train",
    indices: Tensor | None = None,
    rows: Tensor | None = None,
    count_lookup: bool = True,
    info: dict | None = None,
) -> nn.Module:
    """Train a DKVB's values (and decoder) with cross-entropy, at about a linear head's cost.

    Keys and mask are frozen while values train, so each embedding's keys never change: they
    are looked up once (counted once). With the mean decoder the model is then a linear
    classifier over a sparse code of ``C * topk`` ones per row: each step pools the selected
    values, back-propagates to the pooled vector only, spreads that gradient over the selected
    rows and updates just those rows with :class:`LazyAdam`. The decoder's own parameters
    (MLP) use dense Adam. ``indices`` (N, C, topk): the keys ``lookup(data.x)`` returns, when a
    search of ``data`` was already made (the one that also serves activation counts and
    evaluation candidates); counted as a lookup all the same unless ``count_lookup=False`` (the
    caller counted it). ``rows``, a bool mask over the C * K value rows, restricts training to
    those rows: every other value and the decoder stay as they are (re-fitting after a mask).
    ``info`` receives what the value start chose (:func:`~dkvb.value_init.init_values`).
    """
    b = model.bottleneck
    if indices is not None and tuple(indices.shape) != (len(data), b.num_codebooks, b.topk):
        raise ValueError(f"fit_values: indices must be (N, C, topk) = {(len(data), b.num_codebooks, b.topk)}, "
                         f"got {tuple(indices.shape)}")
    codes = b.lookup(data.x) if indices is None else indices.long()
    if rows is None:
        init_values(model, data, codes, config.value_init, probe_c=config.probe_c, ridge=config.value_ridge,
                    ridge_shards=config.ridge_shards, seed=config.seed, flops=flops, chosen=info)
    if rows is not None or config.value_init != "ridge" or config.epochs:  # values trained: no ridge fit
        model.value_ridge.zero_()
    if flops is not None and count_lookup:
        flops.add(lookup_flops(model, len(data)))
    flat = b.flat_indices(codes) if config.epochs else None  # none for a closed-form start alone
    values = LazyAdam(b.values.data.view(-1, b.value_dim), lr=config.lr, weight_decay=config.weight_decay,
                      trainable=rows)
    dense = list(model.decoder.parameters()) if rows is None else []
    dense_opt = torch.optim.Adam(dense, lr=config.lr, weight_decay=config.weight_decay) if dense else None

    def step(idx: Tensor) -> Tensor:
        bags = flat[idx]
        with torch.no_grad():
            pooled = b.pool(bags)
        pooled.requires_grad_(True)
        loss = F.cross_entropy(model.decoder(pooled), data.y.index_select(0, idx),
                               label_smoothing=config.label_smoothing)
        _check(loss, desc)
        if dense_opt is not None:
            dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        values.step(bags, pooled.grad)
        if dense_opt is not None:
            dense_opt.step()
        if flops is not None:  # pooling (one add per selected value element) and decoder, forward + backward;
            # a forgotten class's correction is pooled too, forward only
            flops.add(bags.numel() * ((1 + BACKWARD_FACTOR) * b.value_dim + len(b.corrections.classes)))
            flops.step(model.decoder, pooled)
        return loss

    return _loop(model, len(data), config, step, progress=progress, desc=desc)


class LazyAdam:
    """Adam on the rows of a 2-D tensor that a step touched (the rule of ``torch.optim.SparseAdam``).

    Rows no step selects keep their value and moments. The gradient of a mean-pooled bag
    reaches each of its rows divided by the bag size. Accumulating it and updating the touched
    rows runs as one compiled loop (:func:`_lazy_adam_step`, numba): torch's sparse gradients
    (coalescing) and CPU ``index_add_`` cost 10-50x more per row here. ``weight_decay`` is
    decoupled (AdamW) and applied to touched rows only. ``trainable`` (bool per row) freezes
    the rows it leaves False: they get no gradient and keep their value.
    """

    def __init__(self, weight: Tensor, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, trainable: Tensor | None = None) -> None:
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not weight.is_contiguous():
            raise ValueError("LazyAdam: weight must be a contiguous float32 CPU tensor")
        if trainable is not None and tuple(trainable.shape) != (weight.shape[0],):
            raise ValueError(f"LazyAdam: trainable has shape {tuple(trainable.shape)}, expected ({weight.shape[0]},)")
        self._trainable = (np.ones(weight.shape[0], dtype=np.bool_) if trainable is None
                           else trainable.cpu().numpy().astype(np.bool_))
        self.weight, self.lr, self.betas, self.eps, self.weight_decay = weight, lr, betas, eps, weight_decay
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
        self._grad = np.zeros(weight.shape, dtype=np.float32)
        self._touched = np.zeros(weight.shape[0], dtype=np.bool_)
        self.t = 0

    @torch.no_grad()
    def step(self, bags: Tensor, bag_grad: Tensor) -> None:
        """One update from the gradient ``bag_grad`` (B, D) of mean-pooled bags ``bags`` (B, L) of rows."""
        self.t += 1
        b1, b2 = self.betas
        _lazy_adam_step(
            self.weight.numpy(), self.exp_avg.numpy(), self.exp_avg_sq.numpy(), self._grad, self._touched,
            self._trainable, bags.numpy(), (bag_grad / bags.shape[1]).float().numpy(), self.lr, b1, b2, self.eps,
            self.weight_decay, 1 - b1 ** self.t, 1 - b2 ** self.t,
        )


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _lazy_adam_step(w, m, v, grad, touched, trainable, bags, bag_grad, lr, b1, b2, eps, wd, bc1,
                    bc2):  # pragma: no cover
    """Accumulate ``bag_grad[i]`` into every trainable row of ``bags[i]``, then Adam-update the
    touched rows.

    The update walks the rows in order (a scan of the flags), so the weight, moment and gradient
    rows are read sequentially: in bag order every row was a cache miss in four arrays. NumPy's
    error model (no zero-division check per ``/``; the divisor is at least ``eps`` > 0) lets the
    row loop vectorise: 1.5-2x faster, the same numbers.
    """
    for i in range(bags.shape[0]):
        for j in range(bags.shape[1]):
            r = bags[i, j]
            if not trainable[r]:
                continue
            touched[r] = True
            for d in range(w.shape[1]):
                grad[r, d] += bag_grad[i, d]
    step = lr / bc1
    for r in range(w.shape[0]):
        if not touched[r]:
            continue
        touched[r] = False
        for d in range(w.shape[1]):
            g = grad[r, d]
            grad[r, d] = 0.0
            m[r, d] = b1 * m[r, d] + (1 - b1) * g
            v[r, d] = b2 * v[r, d] + (1 - b2) * g * g
            w[r, d] = w[r, d] * (1 - lr * wd) - step * m[r, d] / (np.sqrt(v[r, d] / bc2) + eps)


def _check(loss: Tensor, desc: str) -> None:
    if not torch.isfinite(loss):
        raise DivergenceError(f"{desc}: loss became {loss.item()} — training diverged")


def _loop(model: nn.Module, n: int, config: TrainConfig, step: Callable[[Tensor], Tensor], *,
          progress: bool, desc: str) -> nn.Module:
    """``config.epochs`` seeded shuffled passes of ``step`` over ``range(n)``, with a progress bar."""
    g = torch.Generator().manual_seed(config.seed)
    model.train()
    steps = config.epochs * math.ceil(n / config.batch_size)
    bar = tqdm(total=steps, desc=desc, disable=not progress, unit="step", leave=False, mininterval=0.5)
    for _ in range(config.epochs):
        for idx in batches(n, config.batch_size, g):
            loss = step(idx)
            bar.update()
            if progress:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return model
