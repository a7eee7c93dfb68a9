"""Reusing one nearest-key search under later masks: each embedding's nearest ``topk + m`` keys
are kept (:class:`Candidates`), and a mask that only adds keys is answered by picking the first
unmasked candidates, searching again only the (row, codebook) pairs left without enough
(:meth:`KeptSelection.select`), or by bringing the kept lists themselves up to the new mask
(:meth:`KeptSelection.refresh`, what re-fitting keeps between requests).
:class:`~dkvb.keys.FrozenKeys` mixes this in.

A pair searched again gets the numbers a full search computes for it: its projection is read
from the product of its (whitened) row with a slab of at least ``MIN_COLS`` projection columns,
its distances from the same product with the keys, both with at least ``MIN_ROWS`` rows and on
one thread. BLAS libraries (MKL here) compute a row or a column with other kernels, so with other
rounding, in products of fewer rows or columns, or in a small product split between threads;
at these sizes each row and column gets the bits of the large products a full search makes (the
tests check the equality, :func:`~dkvb.keys.FrozenKeys.chunks` keeps a search's own chunks large).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
import torch
from torch import Tensor

from .flops import search_flops
from .threads import one_thread

MIN_ROWS = 8
MIN_COLS = 16


class Candidates(NamedTuple):
    """Nearest keys of some embeddings, kept so later masks need no fresh search.

    ``indices``: (N, C, T) rows of the flattened (C * K) key table. In each (row, codebook) list
    the entries not in ``mask`` are the pair's nearest keys not in ``mask``, nearest first, and
    the first ``topk`` entries are among them; any other entry is a key masked since the list was
    searched, or -1 (none). ``mask``: the (C, K) key mask they hold under. Valid for any later mask
    that contains ``mask``.
    """

    indices: Tensor
    mask: Tensor


class KeptSelection:
    """Selection from kept searches; needs the host's ``lookup``, ``nearest``, ``whiten``,
    ``flat_indices``, ``search_chunk``, ``projection``, ``keys``, ``key_mask``, ``search``,
    ``topk``, ``key_dim``, ``num_codebooks`` and ``codebook_size``."""

    # ------------------------------------------------------------ candidates
    @torch.no_grad()
    def candidates(self, x: Tensor, extra: int = 8, *, whitened: bool = False) -> Candidates:
        """Each embedding's nearest ``topk + extra`` keys under the current mask, for :meth:`select`
        (kept as int16/int32 rows of the flattened (C * K) key table: a 60,000-row set with 256
        codebooks takes ~280 MB); ``whitened``: ``x`` is ``whiten_rows`` of the embeddings."""
        k = min(self.topk + extra, int((~self.key_mask).sum(1).min()))
        small = torch.int16 if self.num_codebooks * self.codebook_size < 2**15 else torch.int32
        flat = torch.empty(x.shape[0], self.num_codebooks, k, dtype=small, device=x.device)
        for lo, hi in self.chunks(x.shape[0]):  # by the search's own chunks: int64 for one chunk at a time
            flat[lo:hi] = self.flat_indices(self.nearest(x[lo:hi], k, whitened=whitened)).view(hi - lo, -1, k)
        return Candidates(flat, self.key_mask.clone())

    @torch.no_grad()
    def select(self, x: Tensor, cands: Candidates) -> Tensor:
        """What :meth:`lookup` returns for ``x`` under the current mask, from kept candidates.

        Each row takes its first ``topk`` candidates that are not masked now; where fewer than
        ``topk`` are left in a codebook, that (row, codebook) pair alone is searched again
        (:meth:`_search_pairs`, the numbers a full search computes). A mask that unmasks a key
        the candidates were searched without needs a fresh search (done here, for every row).
        """
        flat = self.select_flat(x, cands)
        offsets = torch.arange(self.num_codebooks).repeat_interleave(self.topk) * self.codebook_size
        return (flat - offsets).view(x.shape[0], self.num_codebooks, self.topk)

    @torch.no_grad()
    def select_flat(self, x: Tensor, cands: Candidates, changed: np.ndarray | None = None) -> Tensor:
        """:meth:`select` as rows of :meth:`flat_indices` (N, C * topk), on the CPU.

        ``changed`` (C * K,) bool, when given, must hold every key masked since ``cands`` were
        searched; then only the rows whose first ``topk`` candidates hold a ``changed`` key are
        selected, and ``(rows, flat)`` is returned: the rows (int64 tensor) and their selections.
        """
        if cands.indices.shape[:2] != (x.shape[0], self.num_codebooks):
            raise ValueError(f"select: candidates for {tuple(cands.indices.shape[:2])} (rows, codebooks) do not match "
                             f"embeddings {tuple(x.shape)} and {self.num_codebooks} codebooks")
        mask = self.key_mask
        flat = cands.indices.numpy()
        masked = mask.flatten().cpu().numpy()
        if changed is not None and not bool(changed[masked & ~cands.mask.flatten().cpu().numpy()].all()):
            raise ValueError("select_flat: changed must hold every key masked since the candidates were searched")
        if bool((cands.mask & ~mask).any()):  # a key unmasked since: every row is searched again
            rows = np.arange(x.shape[0])
            out = self.flat_indices(self.lookup(x)).cpu()
        else:
            rows = _rows_hitting(flat, changed, self.topk) if changed is not None else np.arange(x.shape[0])
            picked = _first_free(flat, masked, rows, self.topk)
            self._search_exhausted(x, rows, picked)
            out = torch.from_numpy(picked)
        return out if changed is None else (torch.from_numpy(rows), out)

    def codes(self, cands: Candidates) -> Tensor:
        """(N, C, topk) key indices: the first ``topk`` candidates, the selection under ``cands.mask``."""
        offsets = torch.arange(self.num_codebooks, device=cands.indices.device).view(1, -1, 1) * self.codebook_size
        return cands.indices[:, :, :self.topk].long() - offsets

    @torch.no_grad()
    def refresh(self, base: Tensor, cands: Candidates, length: int,
                rows: np.ndarray | None = None) -> tuple[Candidates, int]:
        """``cands`` brought up to the current mask: (candidates valid under it, FLOPs spent).

        Each (row, codebook) pair left with fewer than ``topk`` unmasked candidates is searched
        again, alone, for its nearest ``length`` keys (:meth:`_search_pairs`); every other pair
        keeps its list, its unmasked entries moved to the front where one of its first ``topk``
        got masked. The first ``topk`` entries are then what :meth:`lookup` selects, bit for bit.
        ``base``: ``whiten_rows`` of the candidates' embeddings. ``rows`` (bool per row): only
        these rows are brought up to the mask, the others keep their lists as they were (valid
        under ``cands.mask`` only; the caller must track which rows hold). A key unmasked since
        ``cands``, or the faiss backend, gets a fresh search of every row.
        """
        if tuple(cands.indices.shape[:2]) != (base.shape[0], self.num_codebooks):
            raise ValueError(f"refresh: candidates for {tuple(cands.indices.shape[:2])} (rows, codebooks) do not "
                             f"match {base.shape[0]} rows and {self.num_codebooks} codebooks")
        if self.search != "torch" or bool((cands.mask & ~self.key_mask).any()):
            fresh = self.candidates(base, length - self.topk, whitened=True)
            return fresh, search_flops(self, base.shape[0], whitened=True)
        kept = cands.indices.numpy()
        flat = np.full((*kept.shape[:2], max(length, kept.shape[2])), -1, dtype=kept.dtype)
        flat[:, :, :kept.shape[2]] = kept
        every = np.ones(len(flat), dtype=np.bool_) if rows is None else rows
        pairs, codebooks = np.nonzero(_compact(flat, self.key_mask.flatten().cpu().numpy(), self.topk, every))
        found, flops = self._search_pairs(base, pairs, codebooks, flat.shape[2])
        flat[pairs, codebooks] = found
        return Candidates(torch.from_numpy(flat), self.key_mask.clone()), flops

    def _search_pairs(self, base: Tensor, rows: np.ndarray, codebooks: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """The ``k`` nearest unmasked keys of each (row of ``base``, codebook) pair: (P, k) flat key
        rows, nearest first, -1 past the codebook's unmasked keys; and the FLOPs spent.

        A codebook at a time, in chunks of rows, with the numbers of a full search (module
        docstring): ``whiten_dim * MIN_COLS`` multiply-adds per row for the projection slab
        (instead of ``whiten_dim * C * key_dim`` for all codebooks), ``key_dim * K`` for the
        distances. FLOPs by :mod:`dkvb.flops`'s conventions: those two products (padding rows
        included) and one comparison per distance a pair is selected from.
        """
        out = np.full((len(rows), k), -1, dtype=np.int64)
        if not len(rows):
            return out, 0
        proj = self.projection.flatten(1).cpu()
        in_dim, cols = proj.shape
        kd, size = self.key_dim, self.codebook_size
        width = min(cols, max(MIN_COLS, kd))
        keys = self.keys.cpu()
        knorm = keys.pow(2).sum(-1).masked_fill(self.key_mask.cpu(), math.inf)
        free = (~self.key_mask).sum(1).tolist()
        order = np.argsort(codebooks, kind="stable")
        flops, step = 0, self.search_chunk()
        with one_thread():
            for group in np.split(order, np.flatnonzero(np.diff(codebooks[order])) + 1):
                c = int(codebooks[group[0]])
                start = min(c * kd, cols - width)
                slab, off, found = proj[:, start:start + width], c * kd - start, min(k, free[c])
                for i in range(0, len(group), step):
                    part = group[i:i + step]
                    inp = _at_least(base[torch.from_numpy(rows[part]).to(base.device)].cpu(), MIN_ROWS)
                    dist = torch.addmm(knorm[c], (inp @ slab)[:, off:off + kd], keys[c].T, alpha=-2)
                    out[part, :found] = smallest(dist.numpy()[:len(part)], found) + c * size
                    flops += inp.shape[0] * (in_dim * width + kd * size) + len(part) * size
        return out, flops

    def _search_exhausted(self, x: Tensor, rows: np.ndarray, picked: np.ndarray) -> None:
        """Fill the (row, codebook) pairs of ``picked`` (R, C * topk) flat keys of ``x[rows]`` that
        hold a -1 with that pair's ``topk`` nearest unmasked keys (:meth:`_search_pairs` on those
        rows, whitened as a search whitens them)."""
        pairs = picked.reshape(len(picked), self.num_codebooks, self.topk)
        which = np.flatnonzero((pairs < 0).any((1, 2)))
        if not len(which):
            return
        sub, codebooks = np.nonzero((pairs[which] < 0).any(-1))
        idx, step, parts = torch.from_numpy(rows[which]).to(x.device), self.search_chunk(), []
        with one_thread():
            for i in range(0, len(idx), step):
                part = x[idx[i:i + step]].cpu()
                parts.append(self.whiten(_at_least(part, MIN_ROWS))[:len(part)])
        pairs[which[sub], codebooks] = self._search_pairs(torch.cat(parts), sub, codebooks, self.topk)[0]


def smallest(a: np.ndarray, k: int) -> np.ndarray:
    """(n, k) int64: the columns of each row's ``k`` smallest entries, smallest first, ties to the
    lower column (by repeated argmin: numpy's is vectorised; ``a`` gets inf where they were)."""
    out = np.empty((a.shape[0], k), dtype=np.int64)
    rows = np.arange(a.shape[0])
    for j in range(k):
        out[:, j] = a.argmin(axis=1)
        if j + 1 < k:
            a[rows, out[:, j]] = np.inf
    return out


def _at_least(t: Tensor, rows: int) -> Tensor:
    """``t`` (n, d) with zero rows appended up to ``rows`` rows."""
    return t if t.shape[0] >= rows else torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])


@numba.njit(cache=True, nogil=True)
def _compact(flat, masked, topk, rows):  # pragma: no cover - compiled
    """In place over the ``rows`` (bool per row) of (N, C, T) flat candidates: where one of a
    pair's first ``topk`` entries is in ``masked`` (C * K,) or -1, move its unmasked entries to
    the front and fill the rest with -1. Returns (N, C) bool: the pairs of ``rows`` left with
    fewer than ``topk`` unmasked entries."""
    out = np.zeros(flat.shape[:2], dtype=np.bool_)
    for n in range(flat.shape[0]):
        if not rows[n]:
            continue
        for c in range(flat.shape[1]):
            ok = True
            for j in range(topk):
                k = flat[n, c, j]
                if k < 0 or masked[k]:
                    ok = False
                    break
            if ok:
                continue
            m = 0
            for j in range(flat.shape[2]):
                k = flat[n, c, j]
                if k >= 0 and not masked[k]:
                    flat[n, c, m] = k
                    m += 1
            for j in range(m, flat.shape[2]):
                flat[n, c, j] = -1
            out[n, c] = m < topk
    return out


@numba.njit(cache=True, nogil=True)
def _first_free(flat, masked, rows, topk):  # pragma: no cover - compiled
    """(R, C * topk) int64: for each row in ``rows`` of the (N, C, T) flat candidates, each
    codebook's first ``topk`` candidates not in ``masked`` (C * K,) nor -1, in order, and -1 in
    the slots of a codebook with fewer."""
    out = np.full((len(rows), flat.shape[1] * topk), -1, dtype=np.int64)
    for i in range(len(rows)):
        n = rows[i]
        for c in range(flat.shape[1]):
            got = 0
            for j in range(flat.shape[2]):
                k = flat[n, c, j]
                if k >= 0 and not masked[k]:
                    out[i, c * topk + got] = k
                    got += 1
                    if got == topk:
                        break
    return out


@numba.njit(cache=True, nogil=True)
def _rows_hitting(flat, changed, topk):  # pragma: no cover - compiled
    """Rows of the (N, C, T) flat candidates whose first ``topk`` in some codebook hold a key in ``changed``."""
    hit = np.zeros(flat.shape[0], dtype=np.bool_)
    for n in range(flat.shape[0]):
        for c in range(flat.shape[1]):
            for j in range(topk):
                if changed[flat[n, c, j]]:
                    hit[n] = True
                    break
            if hit[n]:
                break
    return np.flatnonzero(hit)
