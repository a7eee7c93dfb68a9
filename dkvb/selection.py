"""Reusing one nearest-key search under later masks: each embedding's nearest ``topk + m`` keys
are kept (:class:`Candidates`), and a mask that only adds keys is answered by picking the first
unmasked candidates, searching again only the (row, codebook) pairs left without one; a kept
lookup is rerouted the same way. :class:`~dkvb.keys.FrozenKeys` mixes this in.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
import torch
from torch import Tensor


class Candidates(NamedTuple):
    """Nearest keys of some embeddings, kept so later masks need no fresh search.

    ``indices``: (N, C, T) nearest keys under ``mask``, nearest first; ``mask``: the (C, K) key
    mask they were searched under. Valid for any later mask that contains ``mask``.
    """

    indices: Tensor
    mask: Tensor


class KeptSelection:
    """Selection from kept searches; needs the host's ``lookup``, ``project``, ``flat_indices``,
    ``search_chunk``, ``keys``, ``key_mask``, ``topk``, ``num_codebooks`` and ``codebook_size``."""

    # ------------------------------------------------------------ candidates
    @torch.no_grad()
    def candidates(self, x: Tensor, extra: int = 8) -> Candidates:
        """Each embedding's nearest ``topk + extra`` keys under the current mask, for :meth:`select`
        (kept as int16/int32 rows of the flattened (C * K) key table: a 60,000-row set with 256
        codebooks takes ~280 MB)."""
        k = min(self.topk + extra, int((~self.key_mask).sum(1).min()))
        flat = self.flat_indices(self.nearest(x, k)).view(x.shape[0], self.num_codebooks, k)
        small = torch.int16 if self.num_codebooks * self.codebook_size < 2**15 else torch.int32
        return Candidates(flat.to(small), self.key_mask.clone())

    @torch.no_grad()
    def select(self, x: Tensor, cands: Candidates) -> Tensor:
        """What :meth:`lookup` returns for ``x`` under the current mask, from kept candidates.

        Each row takes its first ``topk`` candidates that are not masked now; where fewer than
        ``topk`` are left in a codebook, that codebook is searched again (with ``topk=1``, only
        the exhausted (row, codebook) pairs; otherwise the whole row). A mask that unmasks a key
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
        elif self.topk == 1:
            rows = _rows_hitting(flat, changed, 1) if changed is not None else np.arange(x.shape[0])
            picked = _first_free(flat, masked, rows)
            self._search_exhausted(x, rows, picked)
            out = torch.from_numpy(picked)
        else:
            rows = _rows_hitting(flat, changed, self.topk) if changed is not None else np.arange(x.shape[0])
            sub = flat[rows]
            free = ~masked[sub]  # (R, C, T)
            rank = free.cumsum(-1)
            ok = (rank[..., -1] >= self.topk).all(-1)
            keep = free & (rank <= self.topk)
            order = np.argsort(~keep, axis=-1, kind="stable")[..., : self.topk]
            out = torch.from_numpy(np.take_along_axis(sub, order, -1).astype(np.int64)).flatten(1)
            redo = np.flatnonzero(~ok)
            if len(redo):
                out[redo] = self.flat_indices(self.lookup(x[torch.from_numpy(rows[redo]).to(x.device)])).cpu()
        return out if changed is None else (torch.from_numpy(rows), out)

    def _search_exhausted(self, x: Tensor, rows: np.ndarray, picked: np.ndarray) -> None:
        """Fill the -1 entries of ``picked`` (R, C) flat keys of ``x[rows]`` with the nearest
        unmasked key of that row and codebook, by the same projection, distance and argmin as
        :meth:`lookup`: chunks of rows, one codebook at a time, only the pairs that need it."""
        exhausted = picked < 0
        which = np.flatnonzero(exhausted.any(1))
        if not len(which):
            return
        keys = self.keys.cpu()
        knorm = keys.pow(2).sum(-1).masked_fill(self.key_mask.cpu(), math.inf)
        step = self.search_chunk()
        for start in range(0, len(which), step):
            part = which[start:start + step]
            z = self.project(x[torch.from_numpy(rows[part]).to(x.device)]).cpu()
            need = exhausted[part]
            for c in np.flatnonzero(need.any(0)):
                sel = np.flatnonzero(need[:, c])
                buf = torch.addmm(knorm[c], z[torch.from_numpy(sel), c], keys[c].T, alpha=-2)
                picked[part[sel], c] = buf.numpy().argmin(axis=1) + c * self.codebook_size

    @torch.no_grad()
    def reroute(self, x: Tensor, indices: Tensor, old_mask: Tensor) -> Tensor:
        """What :meth:`lookup` returns for ``x`` under the current mask, from ``indices``: its
        lookup under ``old_mask`` (contained in the current mask).

        Keys only ever got masked, so a selection none of whose keys is masked now is still the
        nearest; with ``topk=1`` only the (row, codebook) pairs that lost their key are searched
        again, in their codebook alone (:meth:`_search_exhausted`), otherwise the rows that lost
        one. A mask that unmasks a key, or the faiss backend, gets a fresh search.
        """
        if self.search != "torch" or bool((old_mask & ~self.key_mask).any()):
            return self.lookup(x)
        flat = self.flat_indices(indices.long())
        lost = self.key_mask.flatten()[flat].numpy()  # (N, C * topk)
        rows = np.flatnonzero(lost.any(1))
        if self.topk > 1:
            out = indices.long().clone()
            if len(rows):
                out[torch.from_numpy(rows)] = self.lookup(x[torch.from_numpy(rows).to(x.device)]).cpu()
            return out
        picked = flat.numpy().copy()
        sub = np.where(lost[rows], -1, picked[rows])
        self._search_exhausted(x, rows, sub)
        picked[rows] = sub
        offsets = np.arange(self.num_codebooks) * self.codebook_size
        return torch.from_numpy(picked - offsets).view(x.shape[0], self.num_codebooks, 1)


@numba.njit(cache=True, nogil=True)
def _first_free(flat, masked, rows):  # pragma: no cover - compiled
    """(R, C) int64: for each row in ``rows`` of the (N, C, T) flat candidates, each codebook's
    first candidate not in ``masked`` (C * K,), or -1 where every candidate is masked."""
    out = np.empty((len(rows), flat.shape[1]), dtype=np.int64)
    for i in range(len(rows)):
        n = rows[i]
        for c in range(flat.shape[1]):
            out[i, c] = -1
            for j in range(flat.shape[2]):
                k = flat[n, c, j]
                if not masked[k]:
                    out[i, c] = k
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
