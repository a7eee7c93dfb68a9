"""Where a DKVB's values start before training (mean decoder: values are class scores).

* ``counts``: each key's value is the log of its smoothed class frequencies on the training
  data, a naive-Bayes start. Trained for no epochs, the values stay a function of the cached key
  counts, so a forget request can recompute them without the class exactly
  (:func:`recounted_values`; docs/quality.md#count-values).
* ``ridge``: the values are a ridge regression of the one-hot labels on the code (``C * topk``
  ones per row), solved in closed form: a discriminative fit (0.3-7.2 points of retain-test above
  counts on digits and the 4,000-image sets) that is still a function of the training rows' keys and labels alone, so a
  request solves it again without the class and gets exactly the model retrained without it
  (:func:`ridge_values`; docs/quality.md#ridge-values).
* ``probe``: a tuned logistic-regression probe on the embeddings, spread over the keys. The
  probe's logits on the training rows are regressed (ridge) on the quantised code, the
  concatenation of each row's selected key vectors, so every value starts linear in its key,
  ``value_c(k) = C * B_c @ key_ck + b``, and the model starts as the probe seen through the keys.
  Training then refines each key's value on its own. A key's value is fitted from the few
  hundred rows that select it; starting it where the strongly regularised probe puts it, rather
  than at zero, brought the DKVB from 2.36 to 0.30 points behind the probe on CIFAR-100
  validation (docs/quality.md#value-init).

Nothing here touches the keys or the mask, and each start is counted in FLOPs (analytically:
scikit-learn's solver runs outside torch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numba
import numpy as np
import torch
from torch import Tensor, nn

from .classifier import MeanDecoder
from .data import EmbeddingSet, fingerprint, remembered
from .flops import FlopCounter
from .threads import blas_one_thread, one_thread

# The probe's C is chosen from these on a holdout. A finer grid picks a better probe but not a
# better start (CIFAR-100: 53.64% against 54.02): docs/quality.md#probe-grid
PROBE_GRID: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
PROBE_HOLDOUT = 0.1
# Ridge strength, as a fraction of the code's mean variance: trades following the probe exactly
# against smoothing it over rarely selected keys: docs/quality.md#ridge
RIDGE = 0.1
# ``value_init: ridge``: the ridge penalty per selected key of a row (the penalty is this times
# ``C * topk``, a row's similarity with itself); each small set's best on its validation split lay
# between about 0.1 and 4 times it, within a few images: docs/quality.md#ridge-values
VALUE_RIDGE = 1.0
# The ridge values solve an N x N system (float64): 20,000 rows take 3.2 GB
RIDGE_MAX_ROWS = 20_000


def values_are_class_scores(model: nn.Module) -> bool:
    """Whether ``model``'s values are class scores (a DKVB with the mean decoder): what every
    start but zeros needs."""
    return isinstance(getattr(model, "decoder", None), MeanDecoder)


def init_values(model: nn.Module, data: EmbeddingSet, codes: Tensor, how: str, *, probe_c: float | None = None,
                ridge: float = VALUE_RIDGE, ridge_shards: int = 1, seed: int = 0, flops: FlopCounter | None = None,
                chosen: dict | None = None) -> None:
    """Set ``model``'s values by ``how`` (``"zeros"`` leaves them); ``codes``: the (N, C, topk)
    keys ``data``'s rows select; ``ridge``: the ``ridge`` start's penalty per selected key;
    ``ridge_shards``: its shards (:func:`ridge_values`).
    ``chosen`` receives what the start chose itself (a probe start's ``probe_c`` and holdout
    accuracies, :func:`probe_logits`)."""
    if how == "zeros":
        return
    if not values_are_class_scores(model):
        raise ValueError(f"value_init={how!r} needs the mean decoder (values are class scores)")
    b = model.bottleneck
    if how == "counts":
        values = count_values(b.flat_indices(codes), data.y, b.num_codebooks * b.codebook_size, b.value_dim)
    elif how == "ridge":
        flat = b.flat_indices(codes.int()).reshape(len(data), -1)  # int32: half the memory
        penalty = ridge * flat.shape[1]
        values = ridge_values(flat, data.y, b.num_codebooks * b.codebook_size, b.value_dim, penalty,
                              shards=ridge_shards, flops=flops)
        model.value_ridge.fill_(penalty)
        model.value_ridge_shards.fill_(ridge_shards)
    else:
        logits = probe_logits(data, probe_c=probe_c, seed=seed, flops=flops, chosen=chosen)
        b.start.set(*linear_start(b.keys, codes, logits, flops=flops), b.keys)
        values = b.start.values(b.keys)
        if flops is not None:
            flops.add(2 * values.numel() * b.key_dim)
    with torch.no_grad():
        b.values.copy_(values.view_as(b.values))


def count_values(flat: Tensor, y: Tensor, num_rows: int, num_classes: int) -> Tensor:
    """(num_rows, num_classes): log smoothed class frequencies of the rows selecting each key."""
    counts = torch.zeros(num_rows, num_classes)
    counts.index_put_((flat.flatten(), y.repeat_interleave(flat.shape[1])), torch.ones(flat.numel()),
                      accumulate=True)
    return log_frequencies(counts)


def ridge_values(flat: Tensor, y: Tensor, num_rows: int, num_classes: int, penalty: float, *, shards: int = 1,
                 flops: FlopCounter | None = None) -> Tensor:
    """(num_rows, num_classes): values whose mean over each row's ``L`` selected keys (``flat``,
    (N, L) rows of the value table) is the ridge regression of one-hot ``y`` on the 0/1 code,
    ``w = X.T @ (X @ X.T + penalty * I)^-1 @ Y``, times ``L``; with ``shards`` > 1, the mean of the
    fits on the rows of each shard (:func:`ridge_shards`), which bounds the system by the shard's rows.

    Solved in the dual (an N x N system, whose entries are how many keys two rows share) in float64
    on one thread, the dual solution summed per key in float32: the same rows and labels give the
    same bits, so a request that solves it without a class's rows returns the values of the model
    retrained without them. A class with no row has the value 0 at every key, and so does a key no
    row selects."""
    shard = ridge_shards(y, shards)
    return sum(_ridge_fit(flat[shard == k], y[shard == k], num_rows, num_classes, penalty, flops)
               for k in range(shards)) / shards


def ridge_shards(y: Tensor, shards: int) -> Tensor:
    """(N,) the shard of each row of a sharded ridge fit: the i-th row of each class (in order) goes
    to shard ``i mod shards``, so dropping a class's rows moves no other row to another shard and the
    model retrained without the class has the same shards."""
    order = torch.argsort(y, stable=True)
    counts = torch.bincount(y)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(y)
    rank[order] = torch.arange(len(y)) - starts.repeat_interleave(counts)
    return rank % shards


def _ridge_fit(flat: Tensor, y: Tensor, num_rows: int, num_classes: int, penalty: float,
               flops: FlopCounter | None) -> Tensor:
    """:func:`ridge_values` of one shard's rows (zeros for none)."""
    import scipy.linalg

    n, width = flat.shape
    if not n:
        return torch.zeros(num_rows, num_classes)
    targets = _one_hot(y, num_classes)
    bags = _rows_per_key(flat, num_rows)
    with blas_one_thread():
        factor = _dual_factor(flat, bags, penalty)
        dual = scipy.linalg.cho_solve(factor, targets, check_finite=False)
    if flops is not None:  # the Gram matrix, the factorisation and solve, the values
        flops.add(int(_gram_flops(bags) + n ** 3 / 3 + 2 * n * n * num_classes + n * width * num_classes))
    return width * _sum_per_key(*bags, dual)


def _rows_per_key(flat: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """The transposed code of the rows' selected keys ``flat`` (N, L) as bags: (the rows selecting
    each value-table row, in order of that row; where each of the ``num_rows`` bags starts), int32."""
    width = flat.shape[1]
    order = torch.argsort(flat.reshape(-1), stable=True)
    counts = torch.bincount(flat.reshape(-1), minlength=num_rows)
    starts = torch.cumsum(counts, 0) - counts
    return (order // width).int(), starts.int()


def _sum_per_key(rows: Tensor, starts: Tensor, dual: np.ndarray) -> Tensor:
    """(num_rows, classes) float32 ``X.T @ dual`` for the 0/1 code ``X`` given as bags
    (:func:`_rows_per_key`): each value-table row sums the dual rows of the training rows selecting
    it, in float32 (``embedding_bag``: 4x faster than a float64 sparse product on 4,000 rows)."""
    weights = torch.from_numpy(np.ascontiguousarray(dual, dtype=np.float32))
    return torch.nn.functional.embedding_bag(rows, weights, starts, mode="sum")


def _dual_factor(flat: Tensor, bags: tuple[Tensor, Tensor], penalty: float) -> tuple:
    """The Cholesky factor (scipy's ``cho_factor``, lower) of ``X @ X.T + penalty * I`` for the
    rows' keys ``flat`` (N, L), whose bags per key are ``bags`` (:func:`_rows_per_key`), factorised
    in the Gram matrix's own memory; refuses more than :data:`RIDGE_MAX_ROWS` rows, naming the
    memory they need."""
    import scipy.linalg

    n = len(flat)
    if n > RIDGE_MAX_ROWS:
        raise ValueError(f"value_init=ridge solves an N x N system per shard: {n} rows would take "
                         f"{8 * n * n / 1e9:.1f} GB (at most {RIDGE_MAX_ROWS}); use more train.ridge_shards, "
                         "value_init=counts or a smaller dataset.train_limit")
    rows, starts = bags
    bounds = np.append(starts.numpy(), rows.numel()).astype(np.int64)
    gram = _gram(flat.numpy(), rows.numpy(), bounds, float(penalty))
    # symmetric, so its transpose (a Fortran-ordered view) is the same matrix, factorised in place
    return scipy.linalg.cho_factor(gram.T, lower=True, overwrite_a=True, check_finite=False)


@numba.njit(cache=True, nogil=True)
def _gram(flat, rows, bounds, penalty):  # pragma: no cover - compiled
    """(N, N) float64 ``X @ X.T + penalty * I`` for the 0/1 code ``X`` of the rows' keys ``flat``
    (N, L): entry (i, j) counts the keys rows i and j share, found by walking the bags of the keys
    row i selects (``rows[bounds[k]:bounds[k + 1]]``, the rows selecting key k, in order) up to
    row i. Exact small integers, in a third of a sparse product's time and no sparse matrix."""
    n = flat.shape[0]
    gram = np.empty((n, n))
    shared = np.zeros(n, dtype=np.int64)
    for i in range(n):
        for s in range(flat.shape[1]):
            k = flat[i, s]
            for p in range(bounds[k], bounds[k + 1]):
                j = rows[p]
                if j > i:
                    break
                shared[j] += 1
        for j in range(i + 1):
            gram[i, j] = shared[j]
            gram[j, i] = shared[j]
            shared[j] = 0
        gram[i, i] += penalty
    return gram


def _gram_flops(bags: tuple[Tensor, Tensor]) -> float:
    """The additions :func:`_gram` makes: one per key and pair of rows (a row with itself too)
    selecting it, from the bags' sizes (:func:`_rows_per_key`)."""
    rows, starts = bags
    shared = np.diff(np.append(starts.numpy(), rows.numel())).astype(np.float64)
    return float((shared * (shared + 1) / 2).sum())


def _one_hot(y: Tensor, num_classes: int) -> np.ndarray:
    """(N, num_classes) float64 one-hot rows of the labels ``y``: the ridge fit's targets."""
    targets = np.zeros((len(y), num_classes))
    targets[np.arange(len(y)), y.numpy()] = 1.0
    return targets


def log_frequencies(counts: Tensor) -> Tensor:
    """(rows, classes) class counts per key -> their add-one smoothed log frequencies: a class no
    row of a key belongs to gets ``log(1 / (n + classes))``, what a model never given it holds."""
    counts = counts.float()
    return counts.log1p() - (counts.sum(1, keepdim=True) + counts.shape[1]).log()


def values_without(activation_counts: Tensor, absent: Sequence[int] = ()) -> Tensor:
    """(C * K, classes): the count start of a model whose cached per-class key counts
    (``activation_counts``, (classes, C, K)) are ``activation_counts`` without the classes ``absent``:
    exactly the values a count-valued model built on the training set without them, with the same
    keys, would hold."""
    table = activation_counts.permute(1, 2, 0).reshape(-1, activation_counts.shape[0]).float()
    if len(absent):
        table[:, list(absent)] = 0
    return log_frequencies(table)


# How far (log units) a count-valued model's values may sit from its recomputed counts: float32
# rounding of a few operations per request; a trained value moves by orders of magnitude more.
COUNT_TOLERANCE = 1e-4


def recounted_values(model: nn.Module, forgotten: Sequence[int], forget: Sequence[int],
                     train: EmbeddingSet | None = None, *, flops: FlopCounter | None = None) -> Tensor | None:
    """(C, K, classes): ``model``'s values recomputed from its cached key counts without the classes
    ``forgotten`` and ``forget`` (:func:`values_without`), if its values are those counts without
    ``forgotten``, which the ``forget`` classes' columns decide (a DKVB started from ``counts``,
    trained for no epochs, after requests that recounted it; mean decoder, no probe start); for a
    model with ridge values, solved again without those classes' rows of ``train``
    (:func:`ridge_without`); else ``None``.

    Only the keys a ``forget`` class selected change: there the class's value becomes
    ``log(1 / (n + classes))`` and every other class's moves up by ``log((n + classes) / (n' + classes))``,
    ``n'`` the key's rows without the class: one pass over the values, none over the count table."""
    if float(getattr(model, "value_ridge", 0)) > 0:
        return ridge_without(model, train, forgotten, forget, flops=flops)
    b = getattr(model, "bottleneck", None)
    counts = getattr(model, "activation_counts", None)
    if (b is None or not values_are_class_scores(model) or b.start.is_set or counts is None or counts.ndim != 3
            or counts.shape[0] != b.value_dim or counts.shape[1:] != b.values.shape[:2] or not bool(counts.any())):
        return None
    n, f = counts.shape[0], list(forget)
    values = b.values.detach()
    if not f:  # nothing to recount: the check alone, over every class
        expected = values_without(counts, forgotten).view_as(values)
        return values.clone() if float((values - expected).abs().max()) <= COUNT_TOLERANCE else None
    totals = model.activation_totals()[0]
    rows = (totals - counts[list(forgotten)].sum(0)).float() if len(forgotten) else totals.float()
    log_rows = (rows + n).log()  # (C, K)
    held = counts[f].permute(1, 2, 0).float()  # (C, K, len(f))
    if float((values[..., f] - (held.log1p() - log_rows.unsqueeze(-1))).abs().max()) > COUNT_TOLERANCE:
        return None
    log_left = (rows - held.sum(-1) + n).log()  # equal to log_rows, bit for bit, where no forget row is
    out = values + (log_rows - log_left).unsqueeze(-1)
    out[..., f] = -log_left.unsqueeze(-1)
    return out


# How far a ridge-valued model's values may sit from the solution of its system, relative to the
# largest value: float32 sums of a float64 solve; a trained or count value misses by far more.
RIDGE_TOLERANCE = 1e-3


def ridge_without(model: nn.Module, train: EmbeddingSet | None, forgotten: Sequence[int], forget: Sequence[int], *,
                  flops: FlopCounter | None = None) -> Tensor | None:
    """(C, K, classes): the ridge values (:func:`ridge_values`, ``model.value_ridge`` its penalty,
    ``model.value_ridge_shards`` its shards) of ``train``'s rows outside the classes ``forgotten``
    and ``forget``, if ``model``'s values are those of the rows outside ``forgotten``; else ``None``.

    The check solves the model's :class:`RidgeSystem` without ``forgotten`` and compares, to
    :data:`RIDGE_TOLERANCE`; the rows select their keys with no key masked, as when it was fitted.
    Values the system already checked, or solved itself, for the same forgotten classes are known by
    their digest and not checked again. The new values solve the same system without the forget
    classes' rows: the retrained model's, to float32 rounding (the solve is float64, the N x F
    product and the sums per key float32)."""
    b = getattr(model, "bottleneck", None)
    if b is None or train is None or not values_are_class_scores(model) or b.start.is_set:
        return None
    digest = fingerprint(train.x)
    system, values = _kept_system(model, train, digest), b.values
    if system is None or not system.solves(values, forgotten):
        system = _ridge_system(model, train, digest, flops)
        if not _is_solution(values.detach(), system.values_without(forgotten, flops, copy=False)[0].view_as(values)):
            return None
        _keep(model, system)
        system.remember(values, forgotten)
    if not len(forget):
        return values.detach().clone()
    # a parameter the model keeps as is (masking.recount), so its digest, taken here, is remembered for it
    without = tuple(forgotten) + tuple(forget)
    table, known = system.values_without(without, flops)
    out = nn.Parameter(table.view_as(values), requires_grad=values.requires_grad)
    if known is not None:  # a copy of the table hashed when solved ahead
        remembered(out, "fingerprint", lambda _: known)
    system.remember(out, without)
    return out


def _is_solution(values: Tensor, solved: Tensor) -> bool:
    """Whether ``values`` are the system's solution ``solved``, to :data:`RIDGE_TOLERANCE`."""
    return bool((values - solved).abs().max() <= RIDGE_TOLERANCE * max(float(solved.abs().max()), 1e-12))


def keep_ridge_system(model: nn.Module, train: EmbeddingSet, *, flops: FlopCounter | None = None) -> bool:
    """Make and keep a ridge-valued ``model``'s :class:`RidgeSystem` for its training set ``train``
    now, so that its first request is as fast as the next; ``False`` (nothing made) for any other model."""
    if not float(getattr(model, "value_ridge", 0)) > 0:
        return False
    _keep(model, _ridge_system(model, train, fingerprint(train.x), flops))
    return True


# How many solved value tables a ridge system remembers (each a digest and a class set)
SOLVED_KEPT = 1024
# The most memory a ridge system's tables solved ahead may take (RidgeSystem.solve_ahead): 11 tables
# of 256 x 256 keys and 10 classes take 29 MB, 101 of 256 x 128 keys and 100 classes 1.3 GB
AHEAD_BYTES = 512 * 2 ** 20


@dataclass(eq=False)
class DualInverse:
    """The inverse ``M = (X @ X.T + penalty * I)^-1`` of the dual system of one shard's rows, which
    a request solves again without some rows in milliseconds: by the Schur complement, the inverse
    over the rows ``R`` that stay is ``M_RR - M_RF @ M_FF^-1 @ M_FR``, which only needs the dropped
    rows of ``M``. The rows are sorted by class, so a class's rows of ``M`` are one block, read
    without a copy."""

    width: int  # L, the keys a row selects
    bounds: np.ndarray  # (classes + 1,): class c's rows are bounds[c]:bounds[c + 1]
    key_rows: tuple[Tensor, Tensor]  # the transposed 0/1 code of the rows (_rows_per_key)
    inverse: np.ndarray
    inverse32: np.ndarray  # float32 copy of ``inverse`` for the N x F product of a request (3x faster)
    class_solutions: list  # per class c, M_cc^-1 @ dual_c over its rows: a one-class request's F x F solve
    dual: np.ndarray  # (N, classes): inverse @ the rows' one-hot labels

    @classmethod
    def of(cls, flat: Tensor, y: Tensor, num_rows: int, num_classes: int, penalty: float,
           flops: FlopCounter | None = None) -> "DualInverse":
        """The inverse of the rows selecting the keys ``flat`` (N, L) with labels ``y`` (an N x N
        inversion: 4,000 rows take seconds)."""
        import scipy.linalg

        n = len(y)
        order = torch.argsort(y, stable=True)
        flat = flat[order]
        bounds = np.concatenate([[0], np.cumsum(np.bincount(y.numpy(), minlength=num_classes))])
        bags = _rows_per_key(flat, num_rows)
        with blas_one_thread():
            factor = _dual_factor(flat, bags, penalty)
            # solved against the identity, the arithmetic of a fit's solve: inverting from the factor
            # (LAPACK potri) takes a third of the work, but on an ill-conditioned system it moves an exact
            # request's outputs up to 2.4e-4 from the retrained model's, which the forgetting attack sees
            inverse = scipy.linalg.cho_solve(factor, np.eye(n), check_finite=False)
            dual = inverse @ _one_hot(y[order], num_classes)
            solutions = [scipy.linalg.cho_solve(scipy.linalg.cho_factor(inverse[lo:hi, lo:hi], lower=True,
                                                                        check_finite=False), dual[lo:hi],
                                                check_finite=False) for lo, hi in zip(bounds[:-1], bounds[1:])]
        if flops is not None:  # the Gram matrix's shared keys, its factorisation, the solve against I
            sizes = np.diff(bounds).astype(np.float64)
            flops.add(int(_gram_flops(bags) + n ** 3 / 3 + 2 * n ** 3 + 2 * n * n * num_classes
                          + (sizes ** 3 / 3 + 2 * sizes ** 2 * num_classes).sum()))
        return cls(flat.shape[1], bounds, bags, inverse, inverse.astype(np.float32),
                   solutions, dual)

    def values_without(self, classes: Sequence[int], flops: FlopCounter | None = None) -> Tensor:
        """(C * K, classes) float32: the mean-decoder value table (``L * X.T @ dual``) of the system
        solved without the rows ``F`` of ``classes``.

        The dual solution over the kept rows ``R`` is ``(M_RR - M_RF @ M_FF^-1 @ M_FR) @ Y_R``, and
        since ``M @ Y`` is the full solution, ``dual_R - M_RF @ M_FF^-1 @ dual_F`` for the kept
        classes' columns (``Y_F`` is zero there); the forgotten classes' columns are zero, as in a
        model that never saw them. M is symmetric, so only the dropped rows of M are read, each
        class's block of rows in place, and a single class's ``M_FF^-1 @ dual_F`` is solved when
        the system is made."""
        import scipy.linalg

        n, num_classes = self.dual.shape
        gone = sorted(set(classes))
        blocks = [(int(self.bounds[c]), int(self.bounds[c + 1])) for c in gone]
        f = sum(hi - lo for lo, hi in blocks)
        with blas_one_thread():
            alpha = self.dual.astype(np.float32)
            if f:
                if len(gone) == 1:
                    t = self.class_solutions[gone[0]]
                else:  # M_FF assembled from the classes' blocks, no copy of their rows of M
                    m_ff = np.block([[self.inverse[a:b, c:d] for c, d in blocks] for a, b in blocks])
                    factor = scipy.linalg.cho_factor(m_ff, lower=True, overwrite_a=True, check_finite=False)
                    t = scipy.linalg.cho_solve(factor, np.concatenate([self.dual[a:b] for a, b in blocks]),
                                               check_finite=False)
                t = t.astype(np.float32)
                start = 0
                for lo, hi in blocks:  # M_RF @ t, a class's rows of M at a time (contiguous, read in place)
                    alpha -= self.inverse32[lo:hi].T @ t[start:start + hi - lo]
                    start += hi - lo
                for lo, hi in blocks:
                    alpha[lo:hi] = 0.0
            alpha[:, gone] = 0.0  # a class with no row scores 0 at every key
            alpha *= self.width  # a power of two: exact
        if flops is not None:  # a union's F x F factorisation and solve, the N x F product, the sums per key
            k = num_classes - len(gone)
            flops.add(int((len(gone) > 1) * (f ** 3 / 3 + 2 * f * f * k) + 2 * n * f * k
                          + self.key_rows[0].numel() * k))
        return _sum_per_key(*self.key_rows, alpha)




@dataclass(eq=False)
class RidgeSystem:
    """A ridge-valued model's dual systems over its training rows (``digest``: of their keys and
    labels), one :class:`DualInverse` per shard (:func:`ridge_shards`), kept in memory (never
    saved) and shared with the model's unlearned copies, so that a request solves the values again
    without some classes' rows in milliseconds.

    ``solved`` holds the digests of value tables known to solve the system without some classes'
    rows (checked against it, or solved here), so a request on them skips the check."""

    digest: str
    penalty: float
    shards: int
    rows: str  # fingerprint of the training embeddings
    labels: Tensor  # (N,) their labels
    parts: list[DualInverse]  # one per shard with rows
    solved: dict[str, frozenset] = field(default_factory=dict)
    ahead: dict[frozenset, tuple[Tensor, str]] = field(default_factory=dict)  # solve_ahead: (table, digest)

    def fits(self, rows: str, penalty: float, shards: int) -> bool:
        """Whether this system was made from the training embeddings of fingerprint ``rows`` with
        ``penalty`` and ``shards``."""
        return self.rows == rows and self.penalty == penalty and self.shards == shards

    def remember(self, values: Tensor, without: Sequence[int]) -> None:
        """Note ``values`` as this system's solution without the rows of the classes ``without`` (the
        last :data:`SOLVED_KEPT` noted are kept: a long-running server's memory stays bounded)."""
        self.solved[fingerprint(values)] = frozenset(without)
        while len(self.solved) > SOLVED_KEPT:
            del self.solved[next(iter(self.solved))]

    def solves(self, values: Tensor, without: Sequence[int]) -> bool:
        """Whether ``values`` were noted as this system's solution without the classes ``without``."""
        return self.solved.get(fingerprint(values)) == frozenset(without)

    def values_without(self, classes: Sequence[int], flops: FlopCounter | None = None, *,
                       copy: bool = True) -> tuple[Tensor, str | None]:
        """((C * K, classes) float32 value table solved without the rows of ``classes``, its digest
        or ``None``): the mean over the shards (an empty shard's values are zero), or the table
        solved ahead (:meth:`solve_ahead`) when there is one, which holds the same bits, with the
        digest taken when it was solved; a copy of it, unless ``copy=False`` (to read only)."""
        ahead = self.ahead.get(frozenset(classes))
        if ahead is not None:
            table = ahead[0].clone() if copy else ahead[0]
            return table.view(-1, table.shape[-1]), ahead[1]
        tables = [part.values_without(classes, flops) for part in self.parts]
        return (tables[0] if self.shards == 1 else sum(tables) / self.shards), None

    def solve_ahead(self, shape: Sequence[int], flops: FlopCounter | None = None) -> None:
        """Solve now the tables (shaped ``shape``, the model's values') of every request on the model
        as fitted, without no class and without each class alone, with their digests, if they fit in
        :data:`AHEAD_BYTES`: a request forgetting one class then copies its table, whatever the rows
        (50,000 rows' solve takes 130 ms), and hashes nothing; the check of the model's values
        compares with a table. A later request of a sequence still solves."""
        if not self.parts:
            return
        num_rows, num_classes = self.parts[0].key_rows[1].numel(), self.parts[0].dual.shape[1]
        if 4 * num_rows * num_classes * (num_classes + 1) > AHEAD_BYTES:
            return
        for classes in [()] + [(c,) for c in range(num_classes)]:
            table = self.values_without(classes, flops)[0].view(*shape)
            self.ahead[frozenset(classes)] = (table, fingerprint(table))


# The most recent ridge system of this process, so a server that loads a stored model again after
# each request does not invert the same system again (one kept: the inverse of 4,000 rows and its
# float32 copy take 192 MB)
_RECENT_SYSTEM: list[RidgeSystem] = []


def _kept_system(model: nn.Module, train: EmbeddingSet, rows: str) -> RidgeSystem | None:
    """The system kept on ``model`` if it was made from ``train`` (embeddings' fingerprint ``rows``,
    the same labels) with the model's penalty and shards; the model's keys chose its codes when it
    was made."""
    kept = getattr(model, "ridge_system", None)
    if (kept is None or not kept.fits(rows, float(model.value_ridge), int(model.value_ridge_shards))
            or not torch.equal(kept.labels, train.y)):
        return None
    return kept


def _ridge_system(model: nn.Module, train: EmbeddingSet, rows: str, flops: FlopCounter | None) -> RidgeSystem:
    """The ridge system of ``model`` (its penalty and shards) for ``train`` (embeddings' fingerprint
    ``rows``): the one kept on the model or last kept in this process when it is of the same rows and
    keys, else made (:func:`_keep` keeps it)."""
    import hashlib

    kept = _kept_system(model, train, rows)
    if kept is not None:
        return kept
    penalty, shards = float(model.value_ridge), int(model.value_ridge_shards)
    flat = _ridge_codes(model, train.x, rows)
    digest = hashlib.sha256(flat.numpy().tobytes() + train.y.numpy().tobytes()).hexdigest()
    for kept in _RECENT_SYSTEM:
        if kept.digest == digest and kept.fits(rows, penalty, shards):
            return kept
    b = model.bottleneck
    shard = ridge_shards(train.y, shards)
    parts = [DualInverse.of(flat[shard == k], train.y[shard == k], b.num_codebooks * b.codebook_size, b.value_dim,
                            penalty, flops) for k in range(shards) if bool((shard == k).any())]
    system = RidgeSystem(digest, penalty, shards, rows, train.y.clone(), parts)
    system.solve_ahead(b.values.shape, flops)
    return system


def _keep(model: nn.Module, system: RidgeSystem) -> None:
    """Keep ``system`` on ``model`` and as this process's most recent."""
    model.ridge_system = system
    _RECENT_SYSTEM[:] = [system]


def _ridge_codes(model: nn.Module, x: Tensor, digest: str) -> Tensor:
    """(N, C * topk) int32 value-table rows the training embeddings ``x`` (fingerprint ``digest``)
    select with no key masked: the first ``topk`` of the model's :class:`~dkvb.classifier.CodeCache`
    candidates when it holds ``x`` searched unmasked, else searched by chunks of rows (never the
    whole int64 selection at once: 3.3 GB for 50,000 rows of 1,024 codebooks' top-8)."""
    b, cache = model.bottleneck, getattr(model, "code_cache", None)
    if cache is not None and not bool(cache.candidates.mask.any()) and cache.digest == digest:
        return cache.candidates.indices[:, :, :b.topk].reshape(len(x), -1).int()
    out = torch.empty(len(x), b.num_codebooks * b.topk, dtype=torch.int32)
    mask = b.key_mask.clone()
    b.key_mask.zero_()
    try:
        for lo, hi in b.chunks(len(x)):
            out[lo:hi] = b.flat_indices(b.lookup(x[lo:hi]))
    finally:
        b.key_mask.copy_(mask)
    return out


def values_are_counts(model: nn.Module, absent: Sequence[int] = ()) -> bool:
    """Whether ``model``'s values are its cached key counts without the classes ``absent``
    (:func:`values_without`), every value checked."""
    return recounted_values(model, absent, ()) is not None


def probe_logits(data: EmbeddingSet, *, probe_c: float | None = None, grid: Sequence[float] = PROBE_GRID,
                 seed: int = 0, flops: FlopCounter | None = None, chosen: dict | None = None) -> Tensor:
    """(N, classes) logits on ``data`` of scikit-learn logistic regression on standardised
    embeddings, fitted on ``data``; ``probe_c=None`` chooses C from ``grid`` on a seeded,
    stratified holdout of ``data`` first (never on a test split). ``chosen`` receives ``probe_c``
    and the holdout accuracy of each C tried."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    n, d, k = len(data), data.dim, data.num_classes

    def probe(x: np.ndarray, y: np.ndarray, c: float) -> tuple[StandardScaler, LogisticRegression]:
        scaler = StandardScaler().fit(x)
        clf = LogisticRegression(C=c, max_iter=300, tol=1e-3).fit(scaler.transform(x), y)
        if flops is not None:  # each L-BFGS iteration: logits and their gradient, 2 x (2 N d k)
            flops.add(4 * len(x) * d * k * int(np.max(clf.n_iter_)))
        return scaler, clf

    present = data.y.unique()
    if len(present) < k:  # a class with no rows (a model retrained without it): fit the others
        logits = probe_logits(_present_only(data, present), probe_c=probe_c, grid=grid, seed=seed, flops=flops,
                              chosen=chosen)
        return _with_absent(logits, present, k)
    x, y = data.x.numpy(), data.y.numpy()
    # BLAS on one thread (OpenMP keeps the run's count): OpenBLAS rounds a product split between
    # threads otherwise, and the thread count follows the load, so one seed gave another probe,
    # start and model (Fashion-MNIST, C = 0.01: holdout accuracy 0.8817 at 1 thread, 0.8820 at 2).
    with threadpool_limits(torch.get_num_threads()), threadpool_limits(1, user_api="blas"):
        if probe_c is None:
            fit_part, val = data.holdout(PROBE_HOLDOUT, seed)
            xv, yv = val.x.numpy(), val.y.numpy()
            scores: dict[float, float] = {}
            for c in grid:
                scaler, clf = probe(fit_part.x.numpy(), fit_part.y.numpy(), c)
                scores[c] = float((clf.predict(scaler.transform(xv)) == yv).mean())
            probe_c = max(scores, key=scores.get)
            if chosen is not None:
                chosen["probe_holdout_acc"] = {str(c): v for c, v in scores.items()}
        scaler, clf = probe(x, y, probe_c)
        logits = clf.decision_function(scaler.transform(x))
    if chosen is not None:
        chosen["probe_c"] = probe_c
    if logits.ndim == 1:  # two classes: scikit-learn returns one margin
        logits = np.stack([-logits / 2, logits / 2], axis=1)
    if flops is not None:
        flops.add(2 * n * d * k)
    return torch.from_numpy(logits).float()


def _present_only(data: EmbeddingSet, present: Tensor) -> EmbeddingSet:
    """``data`` relabelled to its ``present`` classes only (0..len(present) - 1)."""
    remap = torch.full((data.num_classes,), -1, dtype=torch.long)
    remap[present] = torch.arange(len(present))
    return EmbeddingSet(data.x, remap[data.y], [data.class_names[i] for i in present.tolist()])


def _with_absent(logits: Tensor, present: Tensor, num_classes: int) -> Tensor:
    """(N, num_classes) logits from the ``present`` classes' columns; every absent class scores
    the row's lowest logit, the score a forget request leaves a class it takes out of the start
    (:func:`~dkvb.unlearn.masking.remove_start`)."""
    out = logits.min(1, keepdim=True).values.expand(-1, num_classes).clone()
    out[:, present] = logits
    return out


def linear_start(keys: Tensor, codes: Tensor, logits: Tensor, *, ridge: float = RIDGE,
                 chunk: int = 4096, flops: FlopCounter | None = None) -> tuple[Tensor, Tensor]:
    """(weight (C, D, classes), bias (classes)) of values linear in their keys,
    ``value_c(k) = C * key_ck @ weight[c] + bias``, whose mean over each row's selected keys best
    fits ``logits`` (ridge): ``keys`` (C, K, D), ``codes`` (N, C, topk) per-codebook key indices
    of the rows. A row's pooled output is then ``sum_c weight[c].T @ mean_j key_c,codes[c, j] + bias``,
    so the fit is a ridge regression on that (N, C * D) code, accumulated in chunks."""
    c_, _, d = keys.shape
    n, width, classes = len(codes), c_ * d, logits.shape[1]
    ar = torch.arange(c_).view(1, -1, 1)
    gram = torch.zeros(width, width, dtype=torch.float64)
    cross = torch.zeros(width, classes, dtype=torch.float64)
    mean_code = torch.zeros(width, dtype=torch.float64)
    for start in range(0, n, chunk):
        q = keys[ar, codes[start:start + chunk]].mean(2).reshape(-1, width).double()
        gram += q.T @ q
        cross += q.T @ logits[start:start + chunk].double()
        mean_code += q.sum(0)
    mean_code /= n
    mean_logit = logits.double().mean(0)
    gram -= n * torch.outer(mean_code, mean_code)  # centred
    cross -= n * torch.outer(mean_code, mean_logit)
    gram += ridge * gram.diagonal().mean() * torch.eye(width, dtype=torch.float64)
    with one_thread():  # LAPACK: the same bits at any thread count
        weight = torch.linalg.solve(gram, cross)
    if flops is not None:  # code products and the solve
        flops.add(2 * n * width * (width + classes) + width ** 3)
    return weight.view(c_, d, classes).float(), (mean_logit - mean_code @ weight).float()
