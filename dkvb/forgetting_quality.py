"""Forgetting quality F of the NeurIPS 2023 Machine Unlearning competition, in numpy.

Sources. Triantafillou et al., "Are we making progress in unlearning? Findings from the first
NeurIPS unlearning competition", arXiv:2406.09073 (2024): the (epsilon, delta)-unlearning notion,
the per-example epsilon estimated from attacks that tell unlearned from retrained models, the
binning of epsilon into per-example points H = 2/2^n and F = mean of H over the forget set, and
the final score F x (retain acc ratio) x (test acc ratio). The competition's evaluation note
("Evaluation for the NeurIPS Machine Unlearning Competition", unlearning-challenge.github.io,
Machine_Unlearning_Metric.pdf, Aug 2023). Every constant and decision rule below follows the
organisers' released scoring code, google-deepmind/unlearning_evaluation (commit ffae0ff):
``metric.py`` (``compute_logit_scaled_confidence``, ``_get_single_threshold_rates``,
``_get_double_threshold_rates``, ``_get_epsilons``, ``compute_forget_score_from_confs``) and
``main.py`` (the final score). Section and equation numbers of the paper are not quoted here;
where the paper's prose and the code could differ, the code is what is implemented.

The method, per forget example s, from N_u unlearned and N_r retrained models:

1. Scalar. Each model's output on s is reduced to the logit-scaled confidence of the true class,
   log p_y - log(1 - p_y) (:func:`true_class_confidence`; the LiRA score the code cites).
2. Attacks. Two families of decision rules on that scalar, evaluated on a fixed grid of
   ``THRESHOLDS_PER_UNIT`` = 100 thresholds per unit:
   - single threshold: "the set with the larger median" for scalars >= t, t on the grid over
     the pooled range;
   - double threshold: "the peakier set" (smaller max - min) for scalars in [l, r], r within
     ``BUFFER`` = 2 of the peakier set's max and r - l within 2 of its range.
   FPR and FNR of each rule are the empirical fractions over the models (point estimates; no
   Clopper-Pearson or other interval, as in the code).
3. Epsilon of one rule, with ``DELTA`` = 1e-5:
   eps = max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)), clipped at 0.
   FPR = FNR = 0 (perfect separation) gives infinity; a rule with exactly one of them 0 is
   dropped (taken as too few samples). The example's epsilon is the max over all rules, clipped
   to [0, ``EPSILON_CAP`` = 50]. If one set's range is under 1% of the other's (``PEAKY_RATIO``),
   the example gets the cap directly (a near-constant set is taken as distinguishable).
4. Binning. Bins of width 0.5 from 0; the n-th bin (n = 1, 2, ...) is worth 2/2^n: [0, 0.5) -> 1,
   [0.5, 1) -> 0.5, [1, 1.5) -> 0.25, ... The bins run up to ceil(log(N - 1)); an epsilon past the
   last bin (including the cap) is worth 0. F is the mean over the forget set, in [0, 1].
5. Final score = F x (mean retain acc / retrained mean retain acc) x (mean test acc / retrained
   mean test acc).

Choices where the sources leave room (stated, not the competition's):

- Ties. The code puts the unlearned set on the "larger median" side on a median tie and the
  originally-negative set inside the interval on a range tie; here both sides are tried on a tie
  and the larger epsilon kept, so epsilon is exactly symmetric under swapping the two sets.
- Grid. The code sizes its right-threshold grid as ceil((max - min) * 100) with max - min = 4 in
  floats, which rounding makes 400 or 401 points; at 401 the left thresholds stop sharing one
  lattice and form a finer set. Here the grid is 400 points with one step for both ends, so on
  a cross-check against the code the two agree except where points of the two sets lie within
  one step (about 0.01) of each other where an interval ends.
- Degenerate cases the code does not reach: both sets constant gives 0 when equal and the cap
  when not; an example where every rule is dropped gives 0 (the code asserts).
- Unequal set sizes: the bins use N = min(N_u, N_r) in :func:`forgetting_report`.
- The scalar is computed exactly in log space (the code adds 1e-45 to probabilities, which caps
  it near +-103.6; the two agree below that).

Small N. With N models per set the smallest non-zero rate is 1/N, so the largest finite epsilon
any rule can show is log(N - 1) up to the delta term (N = 8: 1.95, 16: 2.71, 32: 3.43, 512: 6.24;
:func:`max_finite_epsilon`); anything beyond is perfect separation and goes to the cap. The
estimate is also the max over thousands of rules on the same models, so it is biased upward: two
sets drawn from one distribution still show epsilon > 0, more so at small N. That is why F is
read against :func:`ceiling` (retrained vs retrained on disjoint halves), and why
:func:`forgetting_report` also scores the unlearned set at the ceiling's N.

Also here: :func:`top1_agreement` and :func:`js_divergence`, two output-level distances between
model sets on the same examples, and :func:`forgetting_report`, which gathers everything.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100
BUFFER = 2.0
PEAKY_RATIO = 0.01
BIN_WIDTH = 0.5


# --------------------------------------------------------------------------------------------
# validation


def _model_set(x: Any, name: str, where: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{where}: {name} must be 2-D (models, examples), got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{where}: {name} must hold at least 2 models (rows), got {a.shape[0]}")
    if a.shape[1] < 1:
        raise ValueError(f"{where}: {name} must hold at least 1 example (column), got {a.shape[1]}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{where}: {name} must be finite, got {int(np.sum(~np.isfinite(a)))} NaN/inf values")
    return a


def _logit_sets(a: Any, b: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for x, name in ((a, "logits_a"), (b, "logits_b")):
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 3:
            raise ValueError(f"{where}: {name} must be 3-D (models, examples, classes), got shape {arr.shape}")
        if arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[2] < 2:
            raise ValueError(f"{where}: {name} must have >= 1 model, >= 1 example, >= 2 classes, got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: {name} must be finite, got {int(np.sum(~np.isfinite(arr)))} NaN/inf values")
        out.append(arr)
    if out[0].shape[1:] != out[1].shape[1:]:
        raise ValueError(f"{where}: logits_a and logits_b must agree on (examples, classes), "
                         f"got {out[0].shape[1:]} and {out[1].shape[1:]}")
    return out[0], out[1]


def _check_delta(delta: float, where: str) -> float:
    if not (isinstance(delta, (int, float)) and 0.0 < float(delta) < 1.0):
        raise ValueError(f"{where}: delta must be in (0, 1), got {delta!r}")
    return float(delta)


# --------------------------------------------------------------------------------------------
# the scalar


def true_class_confidence(logits: Any, labels: Any) -> np.ndarray:
    """Logit-scaled true-class confidence log p_y - log(1 - p_y), (N, n, K) logits -> (N, n).

    Computed as z_y - logsumexp_{k != y} z_k, exact in float64 at any confidence.
    """
    where = "true_class_confidence"
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 3:
        raise ValueError(f"{where}: logits must be 3-D (models, examples, classes), got shape {z.shape}")
    n, k = z.shape[1], z.shape[2]
    if k < 2:
        raise ValueError(f"{where}: logits must have at least 2 classes, got {k}")
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{where}: logits must be finite, got {int(np.sum(~np.isfinite(z)))} NaN/inf values")
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers of shape ({n},), got {y.dtype} {y.shape}")
    if n and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"{where}: labels must be in [0, {k}), got range [{y.min()}, {y.max()}]")
    true = np.take_along_axis(z, np.broadcast_to(y[None, :, None], (z.shape[0], n, 1)), axis=2)[..., 0]
    other = np.where(np.arange(k)[None, None, :] == y[None, :, None], -np.inf, z)
    top = other.max(axis=2)
    lse = top + np.log(np.exp(other - top[..., None]).sum(axis=2))
    return true - lse


# --------------------------------------------------------------------------------------------
# per-example epsilon


@lru_cache(maxsize=64)
def _epsilon_table(n_pos: int, n_neg: int, delta: float) -> np.ndarray:
    """Epsilon of a rule by its counts: entry [k_p, k_n] for k_p of n_pos positives and k_n of
    n_neg negatives predicted positive. inf: perfect separation; NaN: rule dropped."""
    kp = np.arange(n_pos + 1, dtype=np.float64)[:, None]
    kn = np.arange(n_neg + 1, dtype=np.float64)[None, :]
    fnr = 1.0 - kp / n_pos
    fpr = kn / n_neg
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(1.0 - delta - fpr) - np.log(fnr)
        b = np.log(1.0 - delta - fnr) - np.log(fpr)
    a = np.where(np.isfinite(a), a, np.nan)
    b = np.where(np.isfinite(b), b, np.nan)
    both = np.where(np.isnan(a), b, np.where(np.isnan(b), a, np.maximum(a, b)))
    eps = np.maximum(both, 0.0)  # NaN stays NaN
    one_zero = (fpr * fnr == 0)
    eps = np.where(one_zero, np.nan, eps)
    eps = np.where((fpr == 0) & (fnr == 0), np.inf, eps)
    eps.setflags(write=False)
    return eps


def _mark(table: np.ndarray, kp: np.ndarray, kn: np.ndarray) -> np.ndarray:
    """Table values of the distinct (k_p, k_n) pairs the rules reach."""
    n_cols = table.shape[1]
    seen = np.zeros(table.size, dtype=bool)
    seen[(kp.astype(np.int64) * n_cols + kn.astype(np.int64)).ravel()] = True
    return table.ravel()[seen]


def _single_threshold(pos: np.ndarray, neg: np.ndarray, delta: float) -> np.ndarray:
    """Rule "pos if scalar >= t", t on the grid over the pooled range."""
    lo = min(pos.min(), neg.min())
    hi = max(pos.max(), neg.max())
    count = int(math.ceil((hi - lo) * THRESHOLDS_PER_UNIT))
    t = np.linspace(lo, hi, num=count)
    ps, ns = np.sort(pos), np.sort(neg)
    kp = ps.size - np.searchsorted(ps, t, side="left")
    kn = ns.size - np.searchsorted(ns, t, side="left")
    return _mark(_epsilon_table(ps.size, ns.size, delta), kp, kn)


def _runs(pairs: np.ndarray) -> np.ndarray:
    """Run index of each row of a (grid, 2) array of counts that only ever grow along the grid."""
    change = np.any(pairs[1:] != pairs[:-1], axis=1)
    return np.concatenate([[0], np.cumsum(change)])


def _double_threshold(peaky: np.ndarray, other: np.ndarray, delta: float) -> np.ndarray:
    """Rule "peaky if l <= scalar <= r": r = max(peaky) - B + i*s, l = r - width - B + j*s,
    i, j = 0..M-1 with M = ceil(2B * THRESHOLDS_PER_UNIT), s = 2B / (M - 1), width = range(peaky).

    So l = min(peaky) - 2B + (i + j)*s: every left threshold lies on one grid of 2M - 1 points,
    and rule (i, j) counts #(x <= r_i) - #(x < l_{i+j}) of each set inside. Those counts change
    only where a data point is passed, so the M^2 rules reduce to runs of equal counts: right run
    k (grid rows i_s..i_e) meets exactly the left runs that hold grid points i_s..i_e + M - 1.
    The reached (count, count) pairs are the same as those of all M^2 rules.
    """
    m = int(math.ceil(2 * BUFFER * THRESHOLDS_PER_UNIT))
    s = 2 * BUFFER / (m - 1)
    right = peaky.max() - BUFFER + s * np.arange(m)
    left = peaky.min() - 2 * BUFFER + s * np.arange(2 * m - 1)
    ps, os_ = np.sort(peaky), np.sort(other)
    le_right = np.stack([np.searchsorted(ps, right, side="right"), np.searchsorted(os_, right, side="right")], 1)
    lt_left = np.stack([np.searchsorted(ps, left, side="left"), np.searchsorted(os_, left, side="left")], 1)
    run_r, run_l = _runs(le_right), _runs(lt_left)
    first = np.flatnonzero(np.concatenate([[True], run_r[1:] != run_r[:-1]]))  # i_s of each right run
    last = np.concatenate([first[1:] - 1, [m - 1]])                             # i_e of each right run
    left_first = np.flatnonzero(np.concatenate([[True], run_l[1:] != run_l[:-1]]))
    lo, hi = run_l[first], run_l[last + m - 1]                                   # left runs reached
    k = np.arange(left_first.size)
    reach = (k[None, :] >= lo[:, None]) & (k[None, :] <= hi[:, None])
    rr, ll = np.nonzero(reach)
    inside = np.maximum(le_right[first[rr]] - lt_left[left_first[ll]], 0)
    return _mark(_epsilon_table(peaky.size, other.size, delta), inside[:, 0], inside[:, 1])


def _example_epsilon(u: np.ndarray, r: np.ndarray, delta: float) -> float:
    range_u, range_r = float(u.max() - u.min()), float(r.max() - r.min())
    largest, smallest = max(range_u, range_r), min(range_u, range_r)
    if largest == 0.0:
        return 0.0 if u[0] == r[0] else EPSILON_CAP
    if smallest / largest < PEAKY_RATIO:
        return EPSILON_CAP
    med_u, med_r = float(np.median(u)), float(np.median(r))
    sides = [(r, u)] if med_r > med_u else [(u, r)] if med_u > med_r else [(u, r), (r, u)]
    inside = [(u, r)] if range_u < range_r else [(r, u)] if range_r < range_u else [(u, r), (r, u)]
    values = [_single_threshold(p, q, delta) for p, q in sides]
    values += [_double_threshold(p, q, delta) for p, q in inside]
    v = np.concatenate(values)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return 0.0
    return float(min(max(v.max(), 0.0), EPSILON_CAP))


def per_example_epsilon(unlearned: Any, retrained: Any, *, delta: float = DELTA) -> np.ndarray:
    """Estimated epsilon of each forget example, (N_u, n) and (N_r, n) scalars -> (n,).

    One row per model, one column per forget example (e.g. :func:`true_class_confidence`).
    Values lie in [0, EPSILON_CAP]; the finite ones are at most :func:`max_finite_epsilon`.
    Symmetric in the two sets.
    """
    where = "per_example_epsilon"
    u = _model_set(unlearned, "unlearned", where)
    r = _model_set(retrained, "retrained", where)
    if u.shape[1] != r.shape[1]:
        raise ValueError(f"{where}: unlearned and retrained must have the same number of examples "
                         f"(columns), got {u.shape[1]} and {r.shape[1]}")
    delta = _check_delta(delta, where)
    return np.array([_example_epsilon(u[:, i], r[:, i], delta) for i in range(u.shape[1])])


def max_finite_epsilon(n_unlearned: int, n_retrained: int | None = None, *, delta: float = DELTA) -> float:
    """Largest finite epsilon any rule can show with these set sizes (about log(N - 1))."""
    n_r = n_unlearned if n_retrained is None else n_retrained
    if n_unlearned < 2 or n_r < 2:
        raise ValueError(f"max_finite_epsilon: set sizes must be >= 2, got {n_unlearned} and {n_r}")
    delta = _check_delta(delta, "max_finite_epsilon")
    best = 0.0
    for a, b in ((n_unlearned, n_r), (n_r, n_unlearned)):
        t = _epsilon_table(a, b, delta)
        best = max(best, float(t[np.isfinite(t)].max()))
    return best


# --------------------------------------------------------------------------------------------
# scores


def _bins_end(num_models: int | None) -> float:
    if num_models is None:
        return EPSILON_CAP
    if not isinstance(num_models, (int, np.integer)) or num_models < 2:
        raise ValueError(f"example_scores: num_models must be an integer >= 2, got {num_models!r}")
    return float(math.ceil(math.log(num_models - 1)))


def example_scores(eps: Any, *, num_models: int | None = None) -> np.ndarray:
    """Points per example: 2/2^n for epsilon in the n-th bin [0.5(n-1), 0.5n), 0 past the bins.

    The bins end at ceil(log(num_models - 1)) as in the competition (N = 8: 4 bins, 16: 6, 32: 8,
    512: 14); ``None`` runs them to ``EPSILON_CAP``. Since no finite epsilon estimated with N
    models per set exceeds log(N - 1), the two agree on :func:`per_example_epsilon`'s output
    for equal set sizes; N = 2 leaves no bin at all, so every example scores 0.
    """
    e = np.asarray(eps, dtype=np.float64)
    if e.ndim != 1:
        raise ValueError(f"example_scores: eps must be 1-D, got shape {e.shape}")
    if np.any(np.isnan(e)) or np.any(e < 0):
        raise ValueError("example_scores: eps must be non-negative and not NaN")
    end = _bins_end(num_models)
    k = np.floor(np.minimum(e, 2 * EPSILON_CAP) / BIN_WIDTH)  # bin index from 0
    inside = (k + 1) * BIN_WIDTH <= end
    return np.where(inside, np.power(2.0, -np.where(inside, k, 0)), 0.0)


def forgetting_score(eps: Any, *, num_models: int | None = None) -> float:
    """F: the mean of :func:`example_scores` over the forget set, in [0, 1] (1 = best)."""
    s = example_scores(eps, num_models=num_models)
    if s.size == 0:
        raise ValueError("forgetting_score: eps must hold at least one example")
    return float(s.mean())


def _mean_acc(x: Any, name: str) -> float:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(a > 1):
        raise ValueError(f"final_score: {name} must be non-empty accuracies in [0, 1], got {x!r}")
    return float(a.mean())


def final_score(F: float, retain_acc: Any, test_acc: Any, retain_acc_retrained: Any,
                test_acc_retrained: Any) -> float:
    """Competition score F x (RA / RA_retrained) x (TA / TA_retrained).

    Each accuracy is a float or the per-model accuracies of its set (averaged, as the code does).
    """
    if not (isinstance(F, (int, float, np.floating)) and 0.0 <= float(F) <= 1.0):
        raise ValueError(f"final_score: F must be in [0, 1], got {F!r}")
    ra, ta = _mean_acc(retain_acc, "retain_acc"), _mean_acc(test_acc, "test_acc")
    rr = _mean_acc(retain_acc_retrained, "retain_acc_retrained")
    tr = _mean_acc(test_acc_retrained, "test_acc_retrained")
    if rr == 0 or tr == 0:
        raise ValueError("final_score: the retrained accuracies must be > 0")
    return float(F) * (ra / rr) * (ta / tr)


def _halves(n: int, rng: Any) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of two disjoint random halves of ``n`` models (an odd one left out)."""
    if n < 4:
        raise ValueError(f"ceiling: needs at least 4 retrained models (two halves of 2), got {n}")
    perm = np.random.default_rng(rng).permutation(n)
    h = n // 2
    return perm[:h], perm[h:2 * h]


def ceiling(retrained_scalars: Any, rng: Any, *, delta: float = DELTA) -> float:
    """F of retrained vs retrained: rows shuffled by ``rng`` (Generator or seed), split into two
    disjoint halves of N_r // 2 models (an odd one left out), bins at N = N_r // 2.

    What an unlearning method indistinguishable from retraining would score at that N; the floor
    is F of the original models vs the retrained ones.
    """
    r = _model_set(retrained_scalars, "retrained_scalars", "ceiling")
    a, b = _halves(r.shape[0], rng)
    return forgetting_score(per_example_epsilon(r[a], r[b], delta=delta), num_models=len(a))


# --------------------------------------------------------------------------------------------
# output-level distances


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top1_agreement(logits_a: Any, logits_b: Any) -> float:
    """Mean over examples and over all (model of a, model of b) pairs of [argmax equal], in [0, 1]."""
    a, b = _logit_sets(logits_a, logits_b, "top1_agreement")
    k = a.shape[2]
    freq = []
    for x in (a, b):
        onehot = np.arange(k)[None, None, :] == x.argmax(axis=2)[..., None]
        freq.append(onehot.mean(axis=0))  # (n, K): fraction of models predicting each class
    return float((freq[0] * freq[1]).sum(axis=1).mean())


def js_divergence(logits_a: Any, logits_b: Any) -> float:
    """Jensen-Shannon divergence in bits (in [0, 1]) between the two sets' mean predictions.

    Per example, the softmax is averaged over each set's models, the JS divergence of the two
    averages is taken, and the mean over examples returned. (Against the mean prediction, not
    per model pair: it is at most the pairwise mean, by convexity.)
    """
    a, b = _logit_sets(logits_a, logits_b, "js_divergence")
    p, q = _softmax(a).mean(axis=0), _softmax(b).mean(axis=0)
    m = 0.5 * (p + q)

    def kl(x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(x > 0, x * (np.log2(x) - np.log2(m)), 0.0)
        return t.sum(axis=1)

    return float(np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, 1.0).mean())


# --------------------------------------------------------------------------------------------
# report


def forgetting_report(unlearned_logits: Any, retrained_logits: Any, labels: Any, *, rng_seed: int = 0,
                      paired: bool = False, delta: float = DELTA) -> dict[str, float | int]:
    """Everything at once, from (N_u, n, K) and (N_r, n, K) logits on the forget set.

    Keys: set sizes and n; ``epsilon_mean``/``epsilon_median``/``epsilon_capped_fraction`` and
    ``max_finite_epsilon``; ``forgetting_score`` (F, bins at N = min(N_u, N_r)); ``ceiling`` with
    its ``ceiling_n`` (= N_r // 2) and epsilon mean/median; ``forgetting_score_at_ceiling_n``
    (N_r // 2 unlearned models vs the ceiling's first half, so F and ceiling share N); and
    ``top1_agreement`` and ``js_divergence`` between the unlearned and retrained sets.

    ``paired``: unlearned row i and retrained row i come from the same seed (N_u == N_r). The
    matched score then takes the unlearned models of the ceiling's second half's seeds, so no
    model meets its own retrained twin and a method that reproduces retraining exactly scores
    the ceiling exactly; unpaired, N_r // 2 unlearned models are drawn at random.
    """
    u_logits, r_logits = _logit_sets(unlearned_logits, retrained_logits, "forgetting_report")
    cu = true_class_confidence(u_logits, labels)
    cr = true_class_confidence(r_logits, labels)
    eps = per_example_epsilon(cu, cr, delta=delta)
    n_models = min(cu.shape[0], cr.shape[0])

    rng = np.random.default_rng(rng_seed)
    a, b = _halves(cr.shape[0], rng)
    h = len(a)
    if paired and cu.shape[0] != cr.shape[0]:
        raise ValueError(f"forgetting_report: paired sets need as many unlearned as retrained models, "
                         f"got {cu.shape[0]} and {cr.shape[0]}")
    if cu.shape[0] < h:
        raise ValueError(f"forgetting_report: needs at least N_r // 2 = {h} unlearned models, got {cu.shape[0]}")
    eps_ceiling = per_example_epsilon(cr[a], cr[b], delta=delta)
    u_half = cu[b] if paired else cu[rng.permutation(cu.shape[0])[:h]]
    eps_matched = per_example_epsilon(u_half, cr[a], delta=delta)

    return {
        "n_unlearned": int(cu.shape[0]),
        "n_retrained": int(cr.shape[0]),
        "n_examples": int(cu.shape[1]),
        "epsilon_mean": float(eps.mean()),
        "epsilon_median": float(np.median(eps)),
        "epsilon_capped_fraction": float(np.mean(eps >= EPSILON_CAP)),
        "max_finite_epsilon": max_finite_epsilon(cu.shape[0], cr.shape[0], delta=delta),
        "forgetting_score": forgetting_score(eps, num_models=n_models),
        "ceiling_n": int(h),
        "ceiling": forgetting_score(eps_ceiling, num_models=h),
        "ceiling_epsilon_mean": float(eps_ceiling.mean()),
        "ceiling_epsilon_median": float(np.median(eps_ceiling)),
        "forgetting_score_at_ceiling_n": forgetting_score(eps_matched, num_models=h),
        "top1_agreement": top1_agreement(u_logits, r_logits),
        "js_divergence": js_divergence(u_logits, r_logits),
    }
