"""The key side of a discrete key-value bottleneck: projections and frozen keys, and the search for
the nearest unmasked keys.

Each codebook sees the embedding through its own frozen projection and holds K keys set by
seeded k-means and then frozen. Masking a key removes it from selection: the next-nearest
unmasked key is chosen instead, which is how a class is unlearned.

Because keys never move after k-means, a search can be kept and reused: :meth:`FrozenKeys.candidates`
returns each embedding's nearest ``topk + extra`` keys once, and :meth:`FrozenKeys.select` picks
the nearest unmasked ones from that list under any later mask, searching again only the rows
whose candidates are all masked. The result equals a fresh search, bit for bit.
"""
from __future__ import annotations

import logging
import math
from typing import Literal

import faiss
import numpy as np
import torch
from torch import Tensor, nn

from .data import check_embeddings
from .selection import KeptSelection, smallest
from .threads import one_thread

SearchBackend = Literal["torch", "faiss"]
Projection = Literal["random", "pca", "whitened", "discriminant"]
PROJECTIONS = ("random", "pca", "whitened", "discriminant")


class FrozenKeys(KeptSelection, nn.Module):
    """C codebooks of K frozen keys behind per-codebook projections, with a key mask and the
    nearest-key search. :class:`dkvb.bottleneck.DiscreteKeyValueBottleneck` adds the values, documents
    the sizes and validates every argument.

    Args:
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
            ``"auto"``: from the number of examples per dimension (:func:`auto_shrinkage`).
        search: ``"torch"`` (matmul distances; on the CPU one codebook at a time with numpy's
            vectorised argmin) or ``"faiss"`` (``IndexFlatL2`` per codebook with masked ids
            excluded by an ``IDSelector``).
        chunk_rows: embeddings searched at once; ``None`` sizes chunks from available memory.
        seed: seeds the projection and k-means.
    """

    def __init__(self, dim: int, num_codebooks: int, codebook_size: int, *, key_dim: int, topk: int,
                 projection: Projection, whiten_dim: int, search: SearchBackend, chunk_rows: int | None,
                 seed: int, discriminant_weight: float, discriminant_shrinkage: float | Literal["auto"]) -> None:
        super().__init__()
        self.dim, self.num_codebooks, self.codebook_size = dim, num_codebooks, codebook_size
        self.key_dim, self.topk = key_dim, topk
        self.projection_kind, self.whiten_dim = projection, min(whiten_dim, dim)
        self.search, self.chunk_rows, self.seed = search, chunk_rows, seed
        self.discriminant_weight, self.discriminant_shrinkage = discriminant_weight, discriminant_shrinkage

        g = torch.Generator().manual_seed(seed)
        # (in, C, key_dim): one matmul projects onto every codebook at once. "whitened" keeps its
        # (dim, whiten_dim) whitening apart, so projecting costs dim*q + q*C*key_dim per row
        # instead of dim*C*key_dim (6x less for 1280 -> 128 -> 256 x 8); "discriminant" too.
        whitened = projection in ("whitened", "discriminant")
        proj = torch.randn(self.whiten_dim if whitened else dim, num_codebooks, key_dim, generator=g)
        self.register_buffer("projection", proj / math.sqrt(proj.shape[0]))
        self.register_buffer("whitening", torch.zeros(dim, self.whiten_dim) if whitened else torch.zeros(0))
        self.register_buffer("keys", torch.zeros(num_codebooks, codebook_size, key_dim))
        self.register_buffer("key_mask", torch.zeros(num_codebooks, codebook_size, dtype=torch.bool))
        self.register_buffer("initted", torch.tensor(False))

    # ------------------------------------------------------------------ keys
    def whiten(self, x: Tensor) -> Tensor:
        """(N, dim) -> (N, in_dim): what every codebook's projection reads (the whitened embeddings
        for ``"whitened"``, ``x`` itself otherwise)."""
        return x @ self.whitening if self.whitening.numel() else x

    def project(self, x: Tensor, *, whitened: bool = False) -> Tensor:
        """(N, dim) -> (N, C, key_dim); ``whitened``: ``x`` is already :meth:`whiten`'s output."""
        w = x if whitened else self.whiten(x)
        return (w @ self.projection.flatten(1)).view(x.shape[0], self.num_codebooks, self.key_dim)

    @torch.no_grad()
    def whiten_rows(self, x: Tensor) -> Tensor:
        """:meth:`whiten` of ``x`` in the chunks a search of ``x`` takes, so each row gets the very
        bits the search computes for it (what :meth:`~dkvb.selection.KeptSelection.refresh` reads)."""
        if not self.whitening.numel() or not len(x):
            return self.whiten(x)
        return torch.cat([self.whiten(x[a:b]) for a, b in self.chunks(x.shape[0])])

    @torch.no_grad()
    def init_keys(self, x: Tensor, y: Tensor | None = None, *, niter: int = 20,
                  max_points_per_centroid: int = 256) -> None:
        """Fit the projection (``pca``/``whitened``/``discriminant``) and run seeded faiss k-means
        per codebook on ``x``, then freeze. Only ``discriminant`` uses the labels ``y``."""
        check_embeddings(x, self.dim)
        if self.projection_kind == "discriminant" and (y is None or len(y) != len(x)):
            raise ValueError("projection 'discriminant' needs the training labels: init_keys(x, y) "
                             f"with one label per embedding (got {None if y is None else len(y)} for {len(x)})")
        if x.shape[0] < self.codebook_size:
            raise ValueError(
                f"k-means needs at least codebook_size={self.codebook_size} embeddings, got {x.shape[0]}"
            )
        x = x.detach().float().cpu()
        if self.projection_kind == "pca":
            self.projection.copy_(_pca_projection(x, self.num_codebooks, self.key_dim, self.seed))
        elif self.projection_kind == "whitened":
            self.whitening.copy_(_whitening(x, self.whiten_dim))
        elif self.projection_kind == "discriminant":
            self.whitening.copy_(_discriminant(x, y.cpu(), self.whiten_dim, weight=self.discriminant_weight,
                                               shrinkage=self.discriminant_shrinkage))
        # faiss trains each codebook on at most K * max_points_per_centroid points (a sample of its
        # own); sampling the rows first (seeded) spares projecting all of a large set onto every
        # codebook at once (ImageNet: 1.28M x 512 x 8 floats, 21 GB)
        cap = self.codebook_size * max_points_per_centroid
        if x.shape[0] > cap:
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))[:cap]]
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
        return self.nearest(x, self.topk)

    @torch.no_grad()
    def nearest(self, x: Tensor, k: int, mask: Tensor | None = None, *, whitened: bool = False) -> Tensor:
        """Indices (N, C, k) of the ``k`` nearest keys not in ``mask`` (default: the key mask), nearest first.

        Ties go to the lower key index. ``whitened``: ``x`` is :meth:`whiten_rows`'s output.
        """
        if not bool(self.initted):
            raise RuntimeError("keys are not initialised: call init_keys(embeddings) first")
        check_embeddings(x, self.projection.shape[0] if whitened else self.dim)
        mask = self.key_mask if mask is None else mask
        short = (~mask).sum(dim=1) < k
        if bool(short.any()):
            c = int(short.nonzero()[0])
            raise RuntimeError(f"codebook {c} has fewer than {k} unmasked keys: nothing left to select")
        if self.search == "faiss":
            return _FaissLookup.apply(self.project(x, whitened=whitened), self.keys, mask, k)
        out = [_nearest_torch(self.project(x[a:b], whitened=whitened), self.keys, k, mask)
               for a, b in self.chunks(x.shape[0])]
        if not out:
            return torch.empty(0, self.num_codebooks, k, dtype=torch.long, device=x.device)
        return torch.cat(out)

    def search_chunk(self) -> int:
        """Rows per search chunk: ``chunk_rows``, or sized from the available memory."""
        return self.chunk_rows or _auto_chunk_rows(self.num_codebooks, self.codebook_size, self.key_dim)

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """(start, stop) of the chunks a search of ``n`` rows takes: at most :meth:`search_chunk`
        rows, of equal sizes, so no chunk is left with the few rows BLAS libraries compute with
        other kernels (other rounding) than a large product's."""
        parts = math.ceil(n / self.search_chunk())
        return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]

    def flat_indices(self, indices: Tensor) -> Tensor:
        """(N, C, topk) per-codebook key indices -> (N, C * topk) rows of ``values.view(C * K, -1)``,
        int32 for int32 indices (half the memory), else int64."""
        dtype = torch.int32 if indices.dtype == torch.int32 else torch.int64
        offsets = torch.arange(self.num_codebooks, device=indices.device, dtype=dtype).view(1, -1, 1)
        offsets = offsets * self.codebook_size
        return (indices + offsets).flatten(1)


def _nearest_torch(z: Tensor, keys: Tensor, k: int, mask: Tensor) -> Tensor:
    """Indices (N, C, k) of the ``k`` nearest keys to projections ``z`` (N, C, key_dim) not in ``mask``."""
    num_codebooks, codebook_size = keys.shape[:2]
    # |z - key|^2 up to the per-row constant |z|^2, written as a matmul so fvcore counts it;
    # masked keys get +inf.
    knorm = keys.pow(2).sum(-1).masked_fill(mask, math.inf)
    if z.device.type != "cpu" or torch.jit.is_tracing():
        dist = torch.bmm(z.transpose(0, 1), keys.transpose(1, 2)).mul_(-2).add_(knorm.unsqueeze(1))
        idx = dist.argmin(-1, keepdim=True) if k == 1 else dist.topk(k, dim=-1, largest=False).indices
        return idx.permute(1, 0, 2)
    # CPU: one codebook at a time keeps the (rows, K) block in cache, and numpy's argmin is
    # vectorised (torch's CPU argmin/topk are ~10x slower at these sizes).
    out = np.empty((z.shape[0], num_codebooks, k), dtype=np.int64)
    buf = torch.empty(z.shape[0], codebook_size)
    for c in range(num_codebooks):
        torch.addmm(knorm[c], z[:, c], keys[c].T, alpha=-2, out=buf)
        out[:, c] = smallest(buf.numpy(), k)
    return torch.from_numpy(out)


def _available_memory() -> int:
    """Bytes of memory available to this process (MemAvailable on Linux; 2 GiB if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 << 30


def _auto_chunk_rows(num_codebooks: int, codebook_size: int, key_dim: int) -> int:
    """Rows per search chunk: the projected chunk plus one codebook's distance block within
    1/16 of available memory, and at most 4,096 rows (larger blocks stop fitting in cache)."""
    per_row = 4 * (num_codebooks * key_dim + codebook_size) + 8 * num_codebooks * 16
    budget = _available_memory() // 16
    return int(max(64, min(4096, budget // per_row)))


def _pca_projection(x: Tensor, num_codebooks: int, key_dim: int, seed: int) -> Tensor:
    """(dim, C, key_dim): each codebook gets a fixed random draw of the top principal directions of ``x``."""
    xc = x - x.mean(0)
    q = min(x.shape[1], num_codebooks * key_dim, x.shape[0])
    with one_thread():  # LAPACK QR and SVD inside: the same bits at any thread count
        _, _, v = torch.pca_lowrank(xc, q=q, center=False, niter=4)  # v: (dim, q)
    g = torch.Generator().manual_seed(seed)
    cols = torch.cat([torch.randperm(q, generator=g) for _ in range(math.ceil(num_codebooks * key_dim / q))])
    return v[:, cols[: num_codebooks * key_dim]].reshape(-1, num_codebooks, key_dim).contiguous()


def _eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh(m)`` (ascending), or scipy's MRRR driver (``evr``) where it fails.

    The matrices here are symmetric and positive semi-definite but very degenerate: a covariance
    of fewer rows than dimensions, a shrunk within-class scatter with hundreds of equal
    eigenvalues, a between-class matrix of rank ``num_classes - 1``. On a 16-core AVX-512
    machine (torch 2.11, MKL) ``eigh`` once refused such a matrix ("failed to converge ... too
    many repeated eigenvalues") that it decomposed on its own elsewhere; a second algorithm
    gives the same subspaces instead of an aborted run.
    """
    try:
        with one_thread():  # LAPACK: the same bits at any thread count
            return torch.linalg.eigh(m)
    except torch.linalg.LinAlgError as e:
        import scipy.linalg
        from threadpoolctl import threadpool_limits

        logging.getLogger(__name__).warning("torch.linalg.eigh failed on a %s matrix (%s); using scipy's evr driver",
                                            tuple(m.shape), e)
        with threadpool_limits(1):
            evals, evecs = scipy.linalg.eigh(m.cpu().numpy(), driver="evr")
        return torch.from_numpy(evals).to(m), torch.from_numpy(evecs).to(m)


MOMENT_ROWS = 16384  # rows per float64 chunk when the projections sum scatter matrices (168 MB at 1,280 dims)


def _mean(x: Tensor) -> Tensor:
    """Float64 mean of the rows of ``x``, summed a chunk at a time."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for a in range(0, x.shape[0], MOMENT_ROWS):
        total += x[a:a + MOMENT_ROWS].double().sum(0)
    return total / max(1, x.shape[0])


def _scatter(x: Tensor, centre: Tensor, groups: Tensor | None = None) -> Tensor:
    """Float64 ``sum_i (x_i - c_i)^T (x_i - c_i)``: ``c_i`` is ``centre`` (dim,), or with ``groups``
    (N,) the row ``centre[groups[i]]`` of a (G, dim) table (the within-class scatter). A chunk at a
    time, so ImageNet-size sets (1.28M x 1,280) need no full float64 copy."""
    out = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for a in range(0, x.shape[0], MOMENT_ROWS):
        part = x[a:a + MOMENT_ROWS].double()
        part -= centre if groups is None else centre[groups[a:a + MOMENT_ROWS]]
        out += part.T @ part
    return out


def _whitening(x: Tensor, whiten_dim: int, cov: Tensor | None = None) -> Tensor:
    """(dim, whiten_dim): PCA-whitening of ``x`` (its top principal directions, each scaled to unit
    variance); columns beyond the rank of ``x`` stay zero. ``cov``: the covariance of ``x``
    (float64, :func:`_scatter` over ``N - 1``) when the caller has it.

    Centering is left out of the result: a constant shift of every projection moves the keys with
    it and changes no nearest-key choice.
    """
    q = min(whiten_dim, *x.shape)
    if cov is None:
        cov = _scatter(x, _mean(x)) / max(1, x.shape[0] - 1)
    evals, evecs = _eigh(cov)  # ascending
    evals, evecs = evals[-q:].flip(0), evecs[:, -q:].flip(1)
    out = torch.zeros(x.shape[1], whiten_dim)
    out[:, :q] = (evecs / (evals.clamp_min(1e-12 * float(evals[0])) ** 0.5)).float()
    return out


def auto_shrinkage(num_examples: int, dim: int) -> float:
    """Within-class covariance shrinkage of the ``discriminant`` projection for ``num_examples``
    embeddings of size ``dim``: ``sqrt(dim / (dim + num_examples))`` (0.17 for 45,000 CIFAR-10
    embeddings of 1,280 dimensions, 0.51 for 3,600). Chosen on CIFAR-10 validation splits: 0.1
    beat 0.3 and 0.5 with 45,000 training embeddings, 0.5 beat 0.1-0.3 and 0.7 with 3,600
    (docs/quality.md#shrinkage)."""
    return math.sqrt(dim / (dim + num_examples))


def _discriminant(x: Tensor, y: Tensor, whiten_dim: int, *, weight: float,
                  shrinkage: float | Literal["auto"]) -> Tensor:
    """(dim, whiten_dim): the class-discriminant (LDA) directions of ``x`` under labels ``y``, then
    the top PCA-whitened directions (:func:`_whitening`) filling the remaining columns.

    The LDA directions (at most ``num_classes - 1``, and at most half the columns) maximise the
    between-class over the within-class variance, the within-class covariance shrunk towards a
    multiple of the identity by ``shrinkage`` (0..1, or ``"auto"``: :func:`auto_shrinkage`).
    Each is scaled to standard deviation ``weight`` over ``x``, so the per-codebook random
    projections, and the k-means keys in them, weigh the directions that separate classes
    ``weight`` times more than a whitened one. PCA whitening alone drops the low-variance
    directions where much of the class information of CIFAR embeddings lies
    (docs/quality.md#projection).
    """
    shrinkage = auto_shrinkage(*x.shape) if shrinkage == "auto" else shrinkage
    classes, inverse = torch.unique(y, return_inverse=True)
    n = min(len(classes) - 1, whiten_dim // 2)
    mu = _mean(x)
    cov = _scatter(x, mu) / max(1, x.shape[0] - 1)
    out = _whitening(x, whiten_dim, cov)
    if n < 1:
        return out
    sums = torch.zeros(len(classes), x.shape[1], dtype=torch.float64)
    for a in range(0, x.shape[0], MOMENT_ROWS):
        sums.index_add_(0, inverse[a:a + MOMENT_ROWS], x[a:a + MOMENT_ROWS].double())
    means = sums / torch.bincount(inverse, minlength=len(classes)).unsqueeze(1).double()
    sw = _scatter(x, means, inverse) / len(x)
    sw = (1 - shrinkage) * sw + shrinkage * float(sw.diagonal().mean()) * torch.eye(x.shape[1], dtype=torch.float64)
    evals, evecs = _eigh(sw)
    root = evecs @ torch.diag(evals.clamp_min(1e-12 * float(evals[-1])) ** -0.5) @ evecs.T  # sw^-1/2
    centred = means - mu
    _, dirs = _eigh(root @ (centred.T @ centred) @ root)  # ascending
    lda = root @ dirs[:, -n:].flip(1)
    std = (lda * (cov @ lda)).sum(0).clamp_min(0).sqrt()  # of each direction's projection over x
    lda = lda * (weight / std.clamp_min(1e-12))
    return torch.cat([lda.float(), out[:, : whiten_dim - n]], 1)


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
