"""Discrete key-value bottleneck (Träuble et al., 2023) with maskable keys.

An embedding is projected once per codebook; each projection selects its ``topk`` nearest
unmasked keys; the selected keys' values (the only trainable tensor) are returned. Keys are
set by k-means on unlabelled embeddings and then frozen, so each input touches ``C * topk``
of the ``C * K`` values. Masking a key removes it from selection: the next-nearest unmasked
key is chosen instead, which is how a class is unlearned.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import faiss
import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from .data import check_embeddings

SearchBackend = Literal["torch", "faiss"]


class BottleneckOutput(NamedTuple):
    """``values``: (N, C, value_dim) selected values averaged over the top-k; ``indices``: (N, C, topk)."""

    values: Tensor
    indices: Tensor


class DiscreteKeyValueBottleneck(nn.Module):
    """C codebooks of K frozen keys, each key with a trainable value.

    Args:
        dim: embedding size of the frozen encoder.
        num_codebooks: C, the number of codebooks (one projection each).
        codebook_size: K, keys per codebook.
        key_dim: size of each projected sub-embedding and key.
        value_dim: size of each value (the number of classes for the mean-pooling decoder).
        topk: keys selected per codebook.
        projection: ``"random"`` (fixed Gaussian, scaled 1/sqrt(dim)) or ``"pca"`` (top principal
            directions of the k-means data, split across codebooks in a fixed random order);
            frozen either way.
        search: ``"torch"`` (batched matmul distances, works on any device) or ``"faiss"``
            (``IndexFlatL2`` per codebook with masked ids excluded by an ``IDSelector``).
        chunk_size: upper bound on the number of distance entries (rows * C * K) computed at once,
            so the N x C x K distance tensor is never materialised for large N.
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
        projection: Literal["random", "pca"] = "random",
        search: SearchBackend = "torch",
        chunk_size: int = 2**25,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, v in dict(dim=dim, num_codebooks=num_codebooks, codebook_size=codebook_size,
                            key_dim=key_dim, value_dim=value_dim, topk=topk, chunk_size=chunk_size).items():
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if topk > codebook_size:
            raise ValueError(f"topk ({topk}) cannot exceed codebook_size ({codebook_size})")
        if projection not in ("random", "pca"):
            raise ValueError(f"projection must be 'random' or 'pca', got {projection!r}")
        if search not in ("torch", "faiss"):
            raise ValueError(f"search must be 'torch' or 'faiss', got {search!r}")
        self.dim, self.num_codebooks, self.codebook_size = dim, num_codebooks, codebook_size
        self.key_dim, self.value_dim, self.topk = key_dim, value_dim, topk
        self.projection_kind, self.search, self.chunk_size, self.seed = projection, search, chunk_size, seed

        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(num_codebooks, dim, key_dim, generator=g) / math.sqrt(dim)
        self.register_buffer("projection", proj)
        self.register_buffer("keys", torch.zeros(num_codebooks, codebook_size, key_dim))
        self.register_buffer("key_mask", torch.zeros(num_codebooks, codebook_size, dtype=torch.bool))
        self.register_buffer("initted", torch.tensor(False))
        self.values = nn.Parameter(torch.zeros(num_codebooks, codebook_size, value_dim))

    # ------------------------------------------------------------------ keys
    def project(self, x: Tensor) -> Tensor:
        """(N, dim) -> (N, C, key_dim)."""
        return torch.einsum("nd,cdk->nck", x, self.projection)

    @torch.no_grad()
    def init_keys(self, x: Tensor, *, niter: int = 20, max_points_per_centroid: int = 256) -> None:
        """Fit the projection (if ``pca``) and run seeded faiss k-means per codebook on ``x``, then freeze."""
        check_embeddings(x, self.dim)
        if x.shape[0] < self.codebook_size:
            raise ValueError(
                f"k-means needs at least codebook_size={self.codebook_size} embeddings, got {x.shape[0]}"
            )
        x = x.detach().float().cpu()
        if self.projection_kind == "pca":
            self.projection.copy_(_pca_projection(x, self.num_codebooks, self.key_dim, self.seed))
        z = self.project(x)
        keys = torch.empty_like(self.keys, device="cpu")
        for c in range(self.num_codebooks):
            km = faiss.Kmeans(
                self.key_dim, self.codebook_size, niter=niter, seed=self.seed + c,
                max_points_per_centroid=max_points_per_centroid, verbose=False,
            )
            km.train(np.ascontiguousarray(z[:, c].numpy(), dtype=np.float32))
            keys[c] = torch.from_numpy(km.centroids)
        self.keys.copy_(keys)
        self.initted.fill_(True)

    # ---------------------------------------------------------------- lookup
    @torch.no_grad()
    def lookup(self, x: Tensor) -> Tensor:
        """Indices (N, C, topk) of the nearest unmasked keys, nearest first."""
        if not bool(self.initted):
            raise RuntimeError("keys are not initialised: call init_keys(embeddings) first")
        check_embeddings(x, self.dim)
        short = (~self.key_mask).sum(dim=1) < self.topk
        if bool(short.any()):
            c = int(short.nonzero()[0])
            raise RuntimeError(f"codebook {c} has fewer than topk={self.topk} unmasked keys: nothing left to select")
        if self.search == "faiss":
            return _FaissLookup.apply(self.project(x), self.keys, self.key_mask, self.topk)
        rows = max(1, self.chunk_size // (self.num_codebooks * self.codebook_size))
        out = [self._lookup_torch(x[i:i + rows]) for i in range(0, x.shape[0], rows)]
        if not out:
            return torch.empty(0, self.num_codebooks, self.topk, dtype=torch.long, device=x.device)
        return torch.cat(out)

    def _lookup_torch(self, x: Tensor) -> Tensor:
        z = rearrange(self.project(x), "n c k -> c n k")
        # |z - key|^2 up to the per-row constant |z|^2, written as a matmul so fvcore counts it.
        dist = torch.bmm(z, self.keys.transpose(1, 2)).mul_(-2).add_(
            (self.keys.pow(2).sum(-1) + self.key_mask * torch.finfo(z.dtype).max / 4).unsqueeze(1)
        )
        if self.topk == 1:
            idx = dist.argmin(dim=-1, keepdim=True)
        else:
            idx = dist.topk(self.topk, dim=-1, largest=False).indices
        return rearrange(idx, "c n t -> n c t")

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Values (N, C, value_dim) for key indices (N, C, topk), averaged over the top-k."""
        c = torch.arange(self.num_codebooks, device=indices.device).view(1, -1, 1)
        return self.values[c, indices].mean(dim=2)

    def forward(self, x: Tensor) -> BottleneckOutput:
        indices = self.lookup(x)
        return BottleneckOutput(self.get_output_from_indices(indices), indices)

    # --------------------------------------------------------------- counts
    @torch.no_grad()
    def activation_counts(self, x: Tensor, y: Tensor, num_classes: int, *, batch_size: int = 8192) -> Tensor:
        """(num_classes, C, K) int64: how often embeddings of each class select each key."""
        counts = torch.zeros(num_classes, self.num_codebooks * self.codebook_size, dtype=torch.long)
        offsets = (torch.arange(self.num_codebooks) * self.codebook_size).view(1, -1, 1)
        for i in range(0, x.shape[0], batch_size):
            idx = (self.lookup(x[i:i + batch_size]).cpu() + offsets).flatten(1)
            counts.index_put_((y[i:i + batch_size].cpu().unsqueeze(1).expand_as(idx), idx),
                              torch.ones_like(idx), accumulate=True)
        return counts.view(num_classes, self.num_codebooks, self.codebook_size)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
                f"key_dim={self.key_dim}, value_dim={self.value_dim}, topk={self.topk}, "
                f"projection={self.projection_kind}, search={self.search}")


def _pca_projection(x: Tensor, num_codebooks: int, key_dim: int, seed: int) -> Tensor:
    """(C, dim, key_dim): each codebook gets a fixed random draw of the top principal directions of ``x``."""
    xc = x - x.mean(0)
    q = min(x.shape[1], num_codebooks * key_dim, x.shape[0])
    _, _, v = torch.pca_lowrank(xc, q=q, center=False, niter=4)  # v: (dim, q)
    g = torch.Generator().manual_seed(seed)
    cols = torch.cat([torch.randperm(q, generator=g) for _ in range(math.ceil(num_codebooks * key_dim / q))])
    return v[:, cols[: num_codebooks * key_dim]].T.reshape(num_codebooks, key_dim, -1).transpose(1, 2).contiguous()


class _FaissLookup(torch.autograd.Function):
    """Nearest unmasked keys via one ``faiss.IndexFlatL2`` per codebook.

    Kept behind an autograd Function so fvcore traces it as one ``prim::PythonOp`` that
    :mod:`dkvb.flops` counts (N * K * key_dim multiply-adds per codebook).
    """

    @staticmethod
    def forward(ctx, z: Tensor, keys: Tensor, key_mask: Tensor, topk: int) -> Tensor:  # noqa: D102
        zc = z.detach().float().cpu().numpy()
        n, num_codebooks, key_dim = (int(s) for s in z.shape)
        out = np.empty((n, num_codebooks, int(topk)), dtype=np.int64)
        for c in range(num_codebooks):
            index = faiss.IndexFlatL2(key_dim)
            index.add(np.ascontiguousarray(keys[c].detach().float().cpu().numpy()))
            masked = key_mask[c].nonzero().flatten().cpu().numpy().astype(np.int64)
            params = None
            if masked.size:
                params = faiss.SearchParameters(sel=faiss.IDSelectorNot(faiss.IDSelectorBatch(masked)))
            _, out[:, c] = index.search(np.ascontiguousarray(zc[:, c]), int(topk), params=params)
        return torch.from_numpy(out).to(z.device)

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - indices carry no gradient
        return None, None, None, None
