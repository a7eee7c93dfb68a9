"""Discrete key-value bottleneck (Träuble et al., 2023) with maskable keys.

An embedding is projected once per codebook; each projection selects its ``topk`` nearest
unmasked keys (:mod:`dkvb.keys`: projections, frozen keys, the key mask and the search); the
selected keys' values (the only trainable tensor) are returned. Keys are set by k-means on
unlabelled embeddings and then frozen, so each input touches ``C * topk`` of the ``C * K``
values. Masking a key removes it from selection, which is how a class is unlearned.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .keys import PROJECTIONS, FrozenKeys, Projection, SearchBackend
from .validate import require, require_choice

__all__ = ["DiscreteKeyValueBottleneck", "BottleneckOutput", "batched_matmul"]


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


class BottleneckOutput(NamedTuple):
    """``values``: (N, C, value_dim) selected values averaged over the top-k; ``indices``: (N, C, topk)."""

    values: Tensor
    indices: Tensor


class DiscreteKeyValueBottleneck(FrozenKeys):
    """C codebooks of K frozen keys, each key with a trainable value.

    Args:
        dim: embedding size of the frozen encoder.
        num_codebooks: C, the number of codebooks (one projection each).
        codebook_size: K, keys per codebook.
        key_dim: size of each projected sub-embedding and key.
        value_dim: size of each value (the number of classes for the mean-pooling decoder).
        topk: keys selected per codebook.
        projection: how each codebook sees the embedding, frozen once fitted:
            ``"random"``: a fixed Gaussian matrix (scaled 1/sqrt(dim));
            ``"pca"``: top principal directions of the k-means data, split across codebooks;
            ``"whitened"``: the k-means data PCA-whitened to ``whiten_dim`` dimensions (every
            direction at unit variance, so weak but discriminative directions are not drowned
            by a few dominant ones), then a fixed Gaussian matrix per codebook;
            ``"discriminant"``: like ``"whitened"``, but the first columns of the whitening are the
            training data's class-discriminant (LDA) directions, scaled up by
            ``discriminant_weight``: fitted with the labels (:meth:`init_keys` ``y``).
        whiten_dim: dimensions kept by ``"whitened"``/``"discriminant"`` (at most ``dim``).
        discriminant_weight: standard deviation of each LDA direction (whitened ones have 1).
        discriminant_shrinkage: shrinkage (0..1) of the within-class covariance towards the identity;
            ``"auto"``: from the number of examples per dimension (:func:`dkvb.keys.auto_shrinkage`).
        search: ``"torch"`` (matmul distances; on the CPU one codebook at a time with numpy's
            vectorised argmin) or ``"faiss"`` (``IndexFlatL2`` per codebook with masked ids
            excluded by an ``IDSelector``).
        chunk_rows: embeddings searched at once; ``None`` sizes chunks from available memory.
        seed: seeds the projection and k-means.
    """

    def __init__(
        self,
        dim: int,
        num_codebooks: int,
        codebook_size: int,
        *,
        key_dim: int = 8,
        value_dim: int,
        topk: int = 1,
        projection: Projection = "random",
        whiten_dim: int = 128,
        search: SearchBackend = "torch",
        chunk_rows: int | None = None,
        seed: int = 0,
        discriminant_weight: float = 4.0,
        discriminant_shrinkage: float | Literal["auto"] = "auto",
    ) -> None:
        for name, v in dict(dim=dim, num_codebooks=num_codebooks, codebook_size=codebook_size,
                            key_dim=key_dim, value_dim=value_dim, topk=topk, whiten_dim=whiten_dim,
                            chunk_rows=chunk_rows or 1).items():
            require(int(v) >= 1, "DiscreteKeyValueBottleneck", name, ">= 1", v)
        require(topk <= codebook_size, "DiscreteKeyValueBottleneck", "topk", f"<= codebook_size={codebook_size}", topk)
        require_choice("DiscreteKeyValueBottleneck", "projection", projection, PROJECTIONS)
        require(discriminant_weight > 0, "DiscreteKeyValueBottleneck", "discriminant_weight", "> 0", discriminant_weight)
        require(discriminant_shrinkage == "auto" or 0 <= discriminant_shrinkage <= 1, "DiscreteKeyValueBottleneck",
                "discriminant_shrinkage", "'auto' or in [0, 1]", discriminant_shrinkage)
        require_choice("DiscreteKeyValueBottleneck", "search", search, ("torch", "faiss"))
        super().__init__(dim, num_codebooks, codebook_size, key_dim=key_dim, topk=topk, projection=projection,
                         whiten_dim=whiten_dim, search=search, chunk_rows=chunk_rows, seed=seed,
                         discriminant_weight=discriminant_weight, discriminant_shrinkage=discriminant_shrinkage)
        self.value_dim = value_dim
        self.values = nn.Parameter(torch.zeros(num_codebooks, codebook_size, value_dim))
        # the linear start the values were initialised from (value_init="probe"), or empty:
        # value_c(k) started as C * key_ck @ value_start[c] + value_start_bias
        self.register_buffer("value_start", torch.zeros(0))
        self.register_buffer("value_start_bias", torch.zeros(0))
        self.register_buffer("value_floor", torch.zeros(0))  # (C, K): each key's lowest start score
        # the classes taken out of the start since training, and what that added to their values
        # (C, K, len(delta_classes)); kept apart so a request need not copy the values
        self.register_buffer("delta_classes", torch.zeros(0, dtype=torch.long))
        self.register_buffer("value_delta", torch.zeros(0))

    # ---------------------------------------------------------------- values
    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Values (N, C, value_dim) for key indices (N, C, topk), averaged over the top-k."""
        c = torch.arange(self.num_codebooks, device=indices.device).view(1, -1, 1)
        return self.value_table()[c, indices].mean(dim=2)

    def value_table(self) -> Tensor:
        """(C, K, value_dim): the values as served, ``values`` plus ``value_delta`` (the start
        taken out of forgotten classes); ``values`` itself when no class was taken out."""
        if not self.delta_classes.numel():
            return self.values
        return self.values.index_add(-1, self.delta_classes, self.value_delta)

    def add_delta(self, classes: Tensor, delta: Tensor) -> None:
        """Add ``delta`` (C, K, len(classes)) to the served values of ``classes``, without writing
        to ``values`` (a masking request shares them with the model it came from). The
        tensors are replaced, never written in place, so copies may share them too."""
        classes = classes.to(self.delta_classes)
        held = [int((self.delta_classes == c).nonzero()[0]) if bool((self.delta_classes == c).any()) else -1
                for c in classes.tolist()]
        if any(h >= 0 for h in held):  # a class corrected before: its column grows by the new delta
            old = self.value_delta.clone()
            for i, h in enumerate(held):
                if h >= 0:
                    old[..., h] += delta[..., i]
            new = [i for i, h in enumerate(held) if h < 0]
            self.value_delta = torch.cat([old, delta[..., new]], -1) if new else old
            self.delta_classes = torch.cat([self.delta_classes, classes[new]])
            return
        self.delta_classes = torch.cat([self.delta_classes, classes])
        self.value_delta = delta.clone() if not self.value_delta.numel() else torch.cat([self.value_delta, delta], -1)

    def check_start(self) -> None:
        """ValueError naming the buffer when the start or the forgotten classes' correction does
        not fit this bottleneck (a checkpoint edited or written by other code)."""
        c, k, v = self.num_codebooks, self.codebook_size, self.value_dim
        if self.has_start:
            self._check_start_shapes(self.value_start, self.value_start_bias, "value_start / value_start_bias")
        if self.value_floor.numel() and tuple(self.value_floor.shape) != (c, k):
            raise ValueError(f"value_floor {tuple(self.value_floor.shape)}: expected {(c, k)}")
        r = len(self.delta_classes)
        if (r or self.value_delta.numel()) and tuple(self.value_delta.shape) != (c, k, r):
            raise ValueError(f"value_delta {tuple(self.value_delta.shape)}: expected {(c, k, r)} for "
                             f"{r} delta_classes")
        if r and (len(set(self.delta_classes.tolist())) != r or not bool(((self.delta_classes >= 0)
                                                                          & (self.delta_classes < v)).all())):
            raise ValueError(f"delta_classes {self.delta_classes.tolist()}: must be distinct classes below {v}")

    def _check_start_shapes(self, weight: Tensor, bias: Tensor, what: str) -> None:
        expected = (self.num_codebooks, self.key_dim, self.value_dim)
        if tuple(weight.shape) != expected or tuple(bias.shape) != (self.value_dim,):
            raise ValueError(f"{what}: weight must be {expected} and bias ({self.value_dim},), "
                             f"got {tuple(weight.shape)} and {tuple(bias.shape)}")

    def fold_delta(self) -> None:
        """Write ``value_delta`` into ``values`` (this model's own) and empty it: before training
        or setting values directly."""
        if self.delta_classes.numel():
            with torch.no_grad():
                self.values.index_add_(-1, self.delta_classes, self.value_delta)
            self.delta_classes, self.value_delta = self.delta_classes[:0], torch.zeros(0)

    def pool(self, flat: Tensor, weight: Tensor | None = None) -> Tensor:
        """(N, value_dim): the mean of the selected values over codebooks and top-k, in one
        ``embedding_bag`` (what both decoders start from); ``flat`` from :meth:`flat_indices`.

        ``weight`` replaces ``values.view(C * K, value_dim)``: the trainer passes a leaf tensor
        sharing the values' memory and gets a sparse gradient (only the selected rows).

        The mean is taken as the bag's sum divided by its size, which is how ``mode="mean"``
        computes it on the CPU (the same numbers, tested) at a third of its time there.
        """
        sparse = weight is not None
        weight = self.values.view(-1, self.value_dim) if weight is None else weight
        out = F.embedding_bag(flat, weight, mode="sum", sparse=sparse)
        if self.delta_classes.numel():
            delta = self.value_delta.view(-1, len(self.delta_classes))
            out = out.index_add(1, self.delta_classes, F.embedding_bag(flat, delta, mode="sum"))
        return out / flat.shape[1]

    @property
    def has_start(self) -> bool:
        return self.value_start.numel() > 0

    def set_start(self, weight: Tensor, bias: Tensor) -> None:
        """Record the linear start: ``weight`` (C, key_dim, value_dim), ``bias`` (value_dim), and
        each key's lowest start score over the classes (``value_floor``)."""
        self._check_start_shapes(weight, bias, "set_start")
        self.value_start, self.value_start_bias = weight.float().clone(), bias.float().clone()
        self.value_floor = torch.zeros(0)
        self.start_floor()

    @property
    def start_classes(self) -> Tensor:
        """(value_dim,) bool: the classes still in the start (a forget request zeroes its classes there)."""
        return (self.value_start.abs().sum((0, 1)) + self.value_start_bias.abs()) > 0

    def start_floor(self) -> Tensor:
        """(C, K) ``value_floor``: each key's lowest start score over the classes still in the
        start; filled here when a start was saved without it."""
        if self.has_start and not self.value_floor.numel():
            self.value_floor = self.start_values().amin(-1)
        return self.value_floor

    def start_values(self, columns: Tensor | None = None) -> Tensor:
        """(C, K, len(columns)): what the linear start gives each key for value ``columns`` (all if
        ``None``); zeros without a start."""
        cols = torch.arange(self.value_dim) if columns is None else torch.as_tensor(columns).long()
        if not self.has_start:
            return torch.zeros(self.num_codebooks, self.codebook_size, len(cols))
        weight = self.value_start.index_select(2, cols)
        return self.num_codebooks * batched_matmul(self.keys, weight) + self.value_start_bias[cols]

    def start_scores(self, rows: Tensor, chunk: int = 8192) -> Tensor:
        """(len(rows), value_dim): the linear start's score of every class at the flat key ``rows``
        (indices into ``values.view(C * K, -1)``), computed at those keys only (``2 * key_dim *
        value_dim`` FLOPs per row).

        On the CPU one compiled loop reads each row's key and its codebook's start weights in
        place (:func:`_start_scores`); gathering the weights per row first, as other devices do
        (in chunks of ``chunk`` rows), took 2-30x longer here (CIFAR-100's 512 x 8 x 100 weights:
        69 ms against 3.6 for 20,000 keys)."""
        rows = torch.as_tensor(rows).long()
        if not self.has_start:
            return torch.zeros(len(rows), self.value_dim)
        total = self.num_codebooks * self.codebook_size
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= total):  # the compiled loop does not check
            raise ValueError(f"start_scores: key rows must lie in [0, {total}), got {int(rows.min())}..{int(rows.max())}")
        flat_keys = self.keys.reshape(-1, self.key_dim)
        if flat_keys.device.type == "cpu":
            scores = np.empty((len(rows), self.value_dim), dtype=np.float32)
            _start_scores(flat_keys.detach().float().contiguous().numpy(),
                          self.value_start.float().contiguous().numpy(), rows.numpy(), self.codebook_size, scores)
            scores = torch.from_numpy(scores)
        else:
            scores = gathered_start_scores(flat_keys, self.value_start, rows.to(flat_keys.device),
                                           self.codebook_size, chunk)
        return self.num_codebooks * scores + self.value_start_bias

    def restart_values(self, rows: Tensor) -> Tensor:
        """(len(rows), value_dim): where training started the flat key ``rows`` (indices into
        ``values.view(C * K, -1)``), as the start stands now: zeros without a start, and the
        classes taken out of it at each key's floor."""
        start = self.start_scores(rows)
        if self.has_start:
            start[:, ~self.start_classes] = self.start_floor().reshape(-1)[rows].unsqueeze(-1)
        return start

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # noqa: D102 - the start buffers take the stored shape (or stay empty)
        for name in ("value_start", "value_start_bias", "value_floor", "delta_classes", "value_delta"):
            key, empty = prefix + name, torch.zeros(0, dtype=getattr(self, name).dtype)
            if key in state_dict:
                setattr(self, name, torch.zeros_like(state_dict[key]))
            else:  # saved before the start (or its delta) existed
                state_dict[key] = empty
                setattr(self, name, empty)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> BottleneckOutput:
        indices = self.lookup(x)
        return BottleneckOutput(self.get_output_from_indices(indices), indices)

    # --------------------------------------------------------------- counts
    @torch.no_grad()
    def activation_counts(self, x: Tensor, y: Tensor, num_classes: int, *, indices: Tensor | None = None) -> Tensor:
        """(num_classes, C, K) int64: how often embeddings of each class select each key.

        ``indices`` (N, C, topk) reuses a lookup of ``x`` already made.
        """
        idx = self.flat_indices(self.lookup(x) if indices is None else indices).cpu()
        rows = y.cpu().view(-1, 1) * (self.num_codebooks * self.codebook_size) + idx
        counts = torch.bincount(rows.flatten(), minlength=num_classes * self.num_codebooks * self.codebook_size)
        return counts.view(num_classes, self.num_codebooks, self.codebook_size)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
                f"key_dim={self.key_dim}, value_dim={self.value_dim}, topk={self.topk}, "
                f"projection={self.projection_kind}, search={self.search}")
