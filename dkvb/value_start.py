"""The state only some DKVBs carry beside their values: the linear start the values began from, and
the per-class corrections forget requests add to the values as served.

:class:`ValueStart` is the start of a probe-started model (``value_init="probe"``,
:mod:`dkvb.value_init`): key ``k`` of codebook ``c`` started at ``C * key_ck @ weight[c] + bias``.
It keeps each key's floor, its lowest start score over the classes still in the start; a forget
request takes a class's share out of the start, and a released key's value restarts from it.
:class:`ClassCorrections` holds what requests added to some classes' served values, (C, K) per
class, apart from the values, so a request need not copy them. Without them both hold empty tensors.

Their tensors are replaced, never written in place, so copies of a model may share them. They are
saved as the bottleneck's own tensors (``value_start``, ``value_start_bias``, ``value_floor``,
``delta_classes``, ``value_delta``: :class:`OptionalBuffers`); a state dict without them loads them empty.
"""
from __future__ import annotations

from typing import ClassVar

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ValueStart", "ClassCorrections", "OptionalBuffers", "restore_saved_names", "batched_matmul",
           "gathered_start_scores"]


class OptionalBuffers(nn.Module):
    """Buffers only some models fill, saved as tensors of the module holding this one: ``SAVED_AS``
    names each buffer in the holder's state dict (the checkpoint format: ``value_start``, not
    ``start.weight``), and the holder loads them back through :func:`restore_saved_names`. Each
    buffer loads at the shape the state dict stores, and empty from a state dict without it."""

    SAVED_AS: ClassVar[dict[str, str]] = {}

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # noqa: D102 - see the class
        holder = prefix[: prefix[:-1].rfind(".") + 1]  # ``prefix`` is the holder's, this module's name and "."
        getattr(destination, "_metadata", {}).pop(prefix[:-1], None)
        for name, saved in self.SAVED_AS.items():
            buffer = getattr(self, name)
            destination[holder + saved] = buffer if keep_vars else buffer.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:  # noqa: D102 - see the class
        for name in self.SAVED_AS:
            key = prefix + name
            if key not in state_dict:
                state_dict[key] = torch.zeros(0, dtype=getattr(self, name).dtype)
            setattr(self, name, torch.zeros_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args)


def restore_saved_names(holder: nn.Module, state_dict: dict[str, Tensor], prefix: str) -> None:
    """Rename, in the state dict ``holder`` loads from (at ``prefix``), its :class:`OptionalBuffers`
    children's saved names to theirs (``value_start`` to ``start.weight``): ``load_state_dict``
    hands each child only the entries under the child's own prefix."""
    for child, part in holder.named_children():
        if isinstance(part, OptionalBuffers):
            for name, saved in part.SAVED_AS.items():
                if prefix + saved in state_dict:
                    state_dict[f"{prefix}{child}.{name}"] = state_dict.pop(prefix + saved)


def batched_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``torch.bmm(a, b)`` without autograd; on the CPU through numpy's matmul, which on many small
    matrices (CIFAR-100's 512 codebooks x 256 keys x 8 dims, one class) took 0.5 ms against 2.3 for
    ``torch.bmm`` (one thread): what a forget request of a probe-started model spends most on."""
    if a.device.type != "cpu":
        return torch.bmm(a, b)
    return torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy()))


def gathered_start_scores(keys: Tensor, weight: Tensor, rows: Tensor, codebook_size: int, chunk: int) -> Tensor:
    """What :func:`_start_scores` computes, with torch on any device: each row's start weights
    gathered (``chunk`` rows at a time, to bound that copy) and multiplied in one ``bmm``."""
    parts = [torch.bmm(keys.index_select(0, part).unsqueeze(1), weight.index_select(0, part // codebook_size)).squeeze(1)
             for part in rows.split(chunk)]
    return torch.cat(parts) if parts else keys.new_zeros(0, weight.shape[-1])


@numba.njit(cache=True, nogil=True)
def _start_scores(keys, weight, rows, codebook_size, out):  # pragma: no cover - compiled
    """``out[i] = keys[rows[i]] @ weight[rows[i] // codebook_size]`` (keys (C * K, d), weight (C, d, V))."""
    for i in range(rows.shape[0]):
        r = rows[i]
        c = r // codebook_size
        for v in range(out.shape[1]):
            out[i, v] = 0.0
        for d in range(keys.shape[1]):
            x = keys[r, d]
            for v in range(out.shape[1]):
                out[i, v] += x * weight[c, d, v]


class ValueStart(OptionalBuffers):
    """The linear start of C codebooks of K keys of size ``key_dim`` with values of size
    ``value_dim``: ``weight`` (C, key_dim, value_dim) and ``bias`` (value_dim,), empty without a
    start, and ``floor`` (C, K), each key's lowest start score over the classes still in it.

    The start's scores are a function of the keys, which the methods take (the bottleneck's
    ``keys``, (C, K, key_dim))."""

    SAVED_AS = {"weight": "value_start", "bias": "value_start_bias", "floor": "value_floor"}

    def __init__(self, num_codebooks: int, codebook_size: int, key_dim: int, value_dim: int) -> None:
        super().__init__()
        self.num_codebooks, self.codebook_size, self.key_dim, self.value_dim = (num_codebooks, codebook_size,
                                                                                 key_dim, value_dim)
        self.register_buffer("weight", torch.zeros(0))
        self.register_buffer("bias", torch.zeros(0))
        self.register_buffer("floor", torch.zeros(0))

    @property
    def is_set(self) -> bool:
        return self.weight.numel() > 0

    def set(self, weight: Tensor, bias: Tensor, keys: Tensor) -> None:
        """Record the start ``weight`` (C, key_dim, value_dim) and ``bias`` (value_dim), and each
        key's floor under it."""
        self._check_shapes(weight, bias, "ValueStart.set")
        self.weight, self.bias = weight.float().clone(), bias.float().clone()
        self.floor = torch.zeros(0)
        self.fill_floor(keys)

    @property
    def classes(self) -> Tensor:
        """(value_dim,) bool: the classes still in the start (a forget request zeroes its classes there)."""
        return (self.weight.abs().sum((0, 1)) + self.bias.abs()) > 0

    def drop_classes(self, columns: Tensor | list[int]) -> None:
        """Zero value ``columns`` in the start (the floor is the caller's to update)."""
        if self.is_set:
            self.weight, self.bias = self.weight.clone(), self.bias.clone()
            self.weight[..., columns] = 0.0
            self.bias[columns] = 0.0

    def fill_floor(self, keys: Tensor) -> Tensor:
        """(C, K) ``floor``, computed here when a start was saved without it."""
        if self.is_set and not self.floor.numel():
            self.floor = self.values(keys).amin(-1)
        return self.floor

    def values(self, keys: Tensor, columns: Tensor | None = None) -> Tensor:
        """(C, K, len(columns)): what the start gives each key for value ``columns`` (all if
        ``None``); zeros without a start."""
        cols = torch.arange(self.value_dim) if columns is None else torch.as_tensor(columns).long()
        if not self.is_set:
            return torch.zeros(self.num_codebooks, self.codebook_size, len(cols))
        weight = self.weight.index_select(2, cols)
        return self.num_codebooks * batched_matmul(keys, weight) + self.bias[cols]

    def scores(self, keys: Tensor, rows: Tensor, chunk: int = 8192) -> Tensor:
        """(len(rows), value_dim): the start's score of every class at the flat key ``rows``
        (indices into ``values.view(C * K, -1)``), computed at those keys only (``2 * key_dim *
        value_dim`` FLOPs per row).

        On the CPU one compiled loop reads each row's key and its codebook's start weights in
        place (:func:`_start_scores`); gathering the weights per row first, as other devices do
        (in chunks of ``chunk`` rows), took 2-30x longer here (CIFAR-100's 512 x 8 x 100 weights:
        69 ms against 3.6 for 20,000 keys)."""
        rows = torch.as_tensor(rows).long()
        if not self.is_set:
            return torch.zeros(len(rows), self.value_dim)
        total = self.num_codebooks * self.codebook_size
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= total):  # the compiled loop does not check
            raise ValueError(f"ValueStart.scores: key rows must lie in [0, {total}), got "
                             f"{int(rows.min())}..{int(rows.max())}")
        flat_keys = keys.reshape(-1, self.key_dim)
        if flat_keys.device.type == "cpu":
            scores = np.empty((len(rows), self.value_dim), dtype=np.float32)
            _start_scores(flat_keys.detach().float().contiguous().numpy(),
                          self.weight.float().contiguous().numpy(), rows.numpy(), self.codebook_size, scores)
            scores = torch.from_numpy(scores)
        else:
            scores = gathered_start_scores(flat_keys, self.weight, rows.to(flat_keys.device), self.codebook_size, chunk)
        return self.num_codebooks * scores + self.bias

    def restart(self, keys: Tensor, rows: Tensor) -> Tensor:
        """(len(rows), value_dim): where training started the flat key ``rows``, as the start
        stands now: zeros without a start, and the classes taken out of it at each key's floor."""
        start = self.scores(keys, rows)
        if self.is_set:
            start[:, ~self.classes] = self.fill_floor(keys).reshape(-1)[rows].unsqueeze(-1)
        return start

    def check(self) -> None:
        """ValueError naming the saved tensor when the start does not fit these sizes (a
        checkpoint edited or written by other code)."""
        if self.is_set:
            self._check_shapes(self.weight, self.bias, "value_start / value_start_bias")
        shape = (self.num_codebooks, self.codebook_size)
        if self.floor.numel() and tuple(self.floor.shape) != shape:
            raise ValueError(f"value_floor {tuple(self.floor.shape)}: expected {shape}")

    def _check_shapes(self, weight: Tensor, bias: Tensor, what: str) -> None:
        expected = (self.num_codebooks, self.key_dim, self.value_dim)
        if tuple(weight.shape) != expected or tuple(bias.shape) != (self.value_dim,):
            raise ValueError(f"{what}: weight must be {expected} and bias ({self.value_dim},), "
                             f"got {tuple(weight.shape)} and {tuple(bias.shape)}")


class ClassCorrections(OptionalBuffers):
    """What forget requests added to the served values of some ``classes`` (long, distinct
    value columns): ``delta`` (C, K, len(classes)), one (C, K) correction per class."""

    SAVED_AS = {"classes": "delta_classes", "delta": "value_delta"}

    def __init__(self, num_codebooks: int, codebook_size: int, value_dim: int) -> None:
        super().__init__()
        self.num_codebooks, self.codebook_size, self.value_dim = num_codebooks, codebook_size, value_dim
        self.register_buffer("classes", torch.zeros(0, dtype=torch.long))
        self.register_buffer("delta", torch.zeros(0))

    def add(self, classes: Tensor, delta: Tensor) -> None:
        """Add ``delta`` (C, K, len(classes)) to the corrections of ``classes``: a class corrected
        before gets the sum in its column."""
        classes = classes.to(self.classes)
        held = [int((self.classes == c).nonzero()[0]) if bool((self.classes == c).any()) else -1
                for c in classes.tolist()]
        if any(h >= 0 for h in held):
            old = self.delta.clone()
            for i, h in enumerate(held):
                if h >= 0:
                    old[..., h] += delta[..., i]
            new = [i for i, h in enumerate(held) if h < 0]
            self.delta = torch.cat([old, delta[..., new]], -1) if new else old
            self.classes = torch.cat([self.classes, classes[new]])
            return
        self.classes = torch.cat([self.classes, classes])
        self.delta = delta.clone() if not self.delta.numel() else torch.cat([self.delta, delta], -1)

    def table(self, values: Tensor) -> Tensor:
        """(C, K, value_dim): ``values`` with the corrections added (``values`` itself without any)."""
        if not self.classes.numel():
            return values
        return values.index_add(-1, self.classes, self.delta)

    def add_pooled(self, flat: Tensor, pooled: Tensor) -> Tensor:
        """``pooled`` (N, value_dim), the sums of the values at the flat key rows ``flat`` (N, bag),
        plus the sums of the corrections there (one ``embedding_bag`` for all corrected classes)."""
        if not self.classes.numel():
            return pooled
        delta = self.delta.view(-1, len(self.classes))
        return pooled.index_add(1, self.classes, F.embedding_bag(flat, delta, mode="sum"))

    def fold_into(self, values: Tensor) -> None:
        """Write the corrections into ``values`` (the model's own) and empty them: before training
        or setting values directly."""
        if self.classes.numel():
            with torch.no_grad():
                values.index_add_(-1, self.classes, self.delta)
            self.classes, self.delta = self.classes[:0], torch.zeros(0)

    def check(self) -> None:
        """ValueError naming the saved tensor when the corrections do not fit these sizes (a
        checkpoint edited or written by other code)."""
        c, k, v, r = self.num_codebooks, self.codebook_size, self.value_dim, len(self.classes)
        if (r or self.delta.numel()) and tuple(self.delta.shape) != (c, k, r):
            raise ValueError(f"value_delta {tuple(self.delta.shape)}: expected {(c, k, r)} for {r} delta_classes")
        if r and (len(set(self.classes.tolist())) != r or not bool(((self.classes >= 0) & (self.classes < v)).all())):
            raise ValueError(f"delta_classes {self.classes.tolist()}: must be distinct classes below {v}")
