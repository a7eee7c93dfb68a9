"""Discrete key-value bottleneck (Träuble et al., 2023) with maskable keys.

An embedding is projected once per codebook; each projection selects its ``topk`` nearest
unmasked keys (:mod:`dkvb.keys`: projections, frozen keys, the key mask and the search); the
selected keys' values (the only trainable tensor) are returned. Keys are set by k-means on
unlabelled embeddings and then frozen, so each input touches ``C * topk`` of the ``C * K``
values. Masking a key removes it from selection, which is how a class is unlearned.

The state only some models carry beside the values (the linear start a probe-started model's
values began from, the corrections forget requests add to some classes' served values) lives in
:mod:`dkvb.value_start`, held here as ``start`` and ``corrections``.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .keys import PROJECTIONS, FrozenKeys, Projection, SearchBackend
from .selection import Candidates
from .validate import require, require_choice
from .value_start import ClassCorrections, ValueStart, restore_saved_names

__all__ = ["DiscreteKeyValueBottleneck", "BottleneckOutput"]


class BottleneckOutput(NamedTuple):
    """``values``: (N, C, value_dim) selected values averaged over the top-k; ``indices``: (N, C, topk)."""

    values: Tensor
    indices: Tensor


class DiscreteKeyValueBottleneck(FrozenKeys):
    """C codebooks of K frozen keys (:class:`~dkvb.keys.FrozenKeys`), each key with a trainable value.

    Args:
        dim: embedding size of the frozen encoder.
        num_codebooks: C, the number of codebooks (one projection each).
        codebook_size: K, keys per codebook.
        key_dim: size of each projected sub-embedding and key.
        value_dim: size of each value (the number of classes for the mean-pooling decoder).
        topk: keys selected per codebook.
        projection, whiten_dim, discriminant_weight, discriminant_shrinkage, search, chunk_rows, seed:
            how the keys are fitted and searched (:class:`~dkvb.keys.FrozenKeys`).
    """

    def __init__(self, dim: int, num_codebooks: int, codebook_size: int, *, key_dim: int = 8, value_dim: int,
                 topk: int = 1, projection: Projection = "random", whiten_dim: int = 128,
                 search: SearchBackend = "torch", chunk_rows: int | None = None, seed: int = 0,
                 discriminant_weight: float = 4.0, discriminant_shrinkage: float | Literal["auto"] = "auto") -> None:
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
        self.start = ValueStart(num_codebooks, codebook_size, key_dim, value_dim)
        self.corrections = ClassCorrections(num_codebooks, codebook_size, value_dim)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        """Loads the start and corrections, which are saved as this module's own tensors."""
        restore_saved_names(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: Tensor) -> BottleneckOutput:
        indices = self.lookup(x)
        return BottleneckOutput(self.get_output_from_indices(indices), indices)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Values (N, C, value_dim) for key indices (N, C, topk), averaged over the top-k."""
        c = torch.arange(self.num_codebooks, device=indices.device).view(1, -1, 1)
        return self.value_table()[c, indices].mean(dim=2)

    def value_table(self) -> Tensor:
        """(C, K, value_dim): the values as served, ``values`` plus the forgotten classes'
        corrections; ``values`` itself without any."""
        return self.corrections.table(self.values)

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
        return self.corrections.add_pooled(flat, out) / flat.shape[1]

    @torch.no_grad()
    def activation_counts(self, x: Tensor, y: Tensor, num_classes: int, *, candidates: Candidates | None = None) -> Tensor:
        """(num_classes, C, K) int64: how often embeddings of each class select each key.

        ``candidates`` (:meth:`candidates` of ``x``) reuses a search of ``x`` already made. Counted
        by the search's chunks of rows, so no (N, C * topk) int64 selection is ever whole in memory.
        """
        size = self.num_codebooks * self.codebook_size
        counts = torch.zeros(num_classes * size, dtype=torch.long)
        for lo, hi in self.chunks(x.shape[0]):
            flat = (self.flat_indices(self.lookup(x[lo:hi])) if candidates is None
                    else candidates.indices[lo:hi, :, :self.topk].reshape(hi - lo, -1).long()).cpu()
            rows = y[lo:hi].cpu().view(-1, 1) * size + flat
            counts += torch.bincount(rows.flatten(), minlength=num_classes * size)
        return counts.view(num_classes, self.num_codebooks, self.codebook_size)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
                f"key_dim={self.key_dim}, value_dim={self.value_dim}, topk={self.topk}, "
                f"projection={self.projection_kind}, search={self.search}")
