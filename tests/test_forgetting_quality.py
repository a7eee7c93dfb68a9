"""Forgetting quality F (dkvb.forgetting_quality): known answers on synthetic model sets."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dkvb import forgetting_quality as fq


def _sets(seed: int, n_models: int, n: int, shift: float = 0.0, extra: int = 0):
    """Per-example scalars for unlearned and retrained sets from one family of distributions."""
    rng = np.random.default_rng(seed)
    mu, sd = rng.normal(0, 3, n), rng.uniform(0.5, 2, n)
    u = mu + shift + sd * rng.normal(size=(n_models, n))
    r = mu + sd * rng.normal(size=(n_models + extra, n))
    return u, r


# --- per-example epsilon -------------------------------------------------------------------


def test_identical_distributions_score_near_the_ceiling():
    n_models = 16
    u, r = _sets(0, n_models, 100, extra=2 * n_models)
    held, r2 = r[:n_models], r[n_models:]  # r2: 2N fresh retrained models, so the ceiling is at N
    F = fq.forgetting_score(fq.per_example_epsilon(u, held), num_models=n_models)
    top = fq.ceiling(r2, np.random.default_rng(1))
    assert top > 0.1 and F > 0.1
    assert abs(F - top) < 0.06


def test_kept_class_scores_the_floor():
    rng = np.random.default_rng(0)
    kept = 8 + rng.normal(size=(16, 30))      # confident on the true class
    forgot = -5 + rng.normal(size=(16, 30))   # retrained without it
    eps = fq.per_example_epsilon(kept, forgot)
    assert np.all(eps == fq.EPSILON_CAP)
    assert fq.forgetting_score(eps, num_models=16) == 0.0


def test_epsilon_is_symmetric_in_the_two_sets_ties_included():
    u, r = _sets(2, 8, 40, shift=0.7)
    assert np.array_equal(fq.per_example_epsilon(u, r), fq.per_example_epsilon(r, u))
    # coarse values: equal medians and equal ranges happen
    uq, rq = np.round(u), np.round(r)
    assert np.array_equal(fq.per_example_epsilon(uq, rq), fq.per_example_epsilon(rq, uq))
    # unequal set sizes
    assert np.array_equal(fq.per_example_epsilon(u[:5], r), fq.per_example_epsilon(r, u[:5]))


def test_epsilon_grows_and_F_falls_with_separation():
    rng = np.random.default_rng(3)
    base_u, base_r = rng.normal(size=(16, 40)), rng.normal(size=(16, 40))
    means, scores = [], []
    for d in (0.0, 1.0, 2.0, 4.0, 8.0):
        eps = fq.per_example_epsilon(base_u + d, base_r)
        means.append(eps.mean())
        scores.append(fq.forgetting_score(eps, num_models=16))
    assert all(a < b for a, b in zip(means, means[1:]))
    assert all(a > b for a, b in zip(scores[:-1], scores[1:-1])) and scores[-1] == 0.0


def test_saturation_at_log_n_minus_one():
    for n_models in (8, 16, 32):
        top = fq.max_finite_epsilon(n_models)
        assert top == pytest.approx(math.log((1 - fq.DELTA - 1 / n_models) * n_models))
        assert top < math.log(n_models - 1) < top + 1e-3
        # separated except one model on each side: FPR = FNR = 1/N is the best any rule does
        u = np.linspace(5, 6, n_models)[:, None]
        r = np.linspace(0, 1, n_models)[:, None]
        u[0], r[-1] = 0.5, 5.5
        assert fq.per_example_epsilon(u, r)[0] == pytest.approx(top)
        # and a random overlap never shows more than the saturation value
        a, b = _sets(n_models, n_models, 30, shift=1.5)
        eps = fq.per_example_epsilon(a, b)
        assert np.all((eps <= top + 1e-12) | (eps == fq.EPSILON_CAP))


def test_degenerate_sets():
    const = np.zeros((4, 1))
    assert fq.per_example_epsilon(const, const)[0] == 0.0
    assert fq.per_example_epsilon(const, const + 1)[0] == fq.EPSILON_CAP
    spread = np.array([[0.0], [1.0], [2.0], [3.0]])
    assert fq.per_example_epsilon(const + 1.5, spread)[0] == fq.EPSILON_CAP  # a point mass is peaky


def test_double_threshold_runs_match_every_grid_rule():
    rng = np.random.default_rng(5)
    for _ in range(4):
        peaky, other = rng.normal(0, 0.6, 6), rng.normal(0.3, 1.0, 7)
        got = np.sort(fq._double_threshold(peaky, other, fq.DELTA))
        m = int(math.ceil(2 * fq.BUFFER * fq.THRESHOLDS_PER_UNIT))
        s = 2 * fq.BUFFER / (m - 1)
        i, j = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
        r = peaky.max() - fq.BUFFER + s * i
        left = peaky.min() - 2 * fq.BUFFER + s * (i + j)
        kp = ((peaky[:, None, None] >= left) & (peaky[:, None, None] <= r)).sum(0)
        kn = ((other[:, None, None] >= left) & (other[:, None, None] <= r)).sum(0)
        table = fq._epsilon_table(6, 7, fq.DELTA)
        want = np.sort(np.unique(table[kp.ravel(), kn.ravel()]))
        np.testing.assert_array_equal(np.sort(np.unique(got)), want)


# --- scores --------------------------------------------------------------------------------


def test_bins_are_worth_two_over_two_to_the_n():
    eps = [0.0, 0.49, 0.5, 0.99, 1.0, 1.6, 2.4, fq.EPSILON_CAP]
    np.testing.assert_array_equal(fq.example_scores(eps), [1, 1, 0.5, 0.5, 0.25, 0.125, 0.0625, 0])
    # N = 8: bins end at ceil(log 7) = 2
    np.testing.assert_array_equal(fq.example_scores([1.99, 2.0], num_models=8), [0.125, 0.0])
    # N = 512 (the competition): 14 bins, ending at 7
    np.testing.assert_array_equal(fq.example_scores([6.9, 7.0], num_models=512), [2.0 ** -13, 0.0])
    assert fq.forgetting_score([0.0, 0.7, 50.0], num_models=16) == pytest.approx(0.5)
    assert fq.forgetting_score([0.0, 0.1], num_models=2) == 0.0  # N = 2 has no bin


def test_final_score_is_F_times_accuracy_ratios():
    assert fq.final_score(0.5, 0.9, 0.8, 0.9, 0.8) == pytest.approx(0.5)
    assert fq.final_score(0.2, [0.8, 0.9], 0.6, 0.85, [0.7, 0.9]) == pytest.approx(0.2 * 1.0 * 0.75)
    with pytest.raises(ValueError):
        fq.final_score(0.5, 0.9, 0.8, 0.0, 0.8)
    with pytest.raises(ValueError):
        fq.final_score(1.5, 0.9, 0.8, 0.9, 0.8)


# --- scalar and output-level distances -----------------------------------------------------


def test_true_class_confidence_is_logit_of_p_true():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 5, 4))
    y = np.array([0, 1, 2, 3, 1])
    p = np.exp(z) / np.exp(z).sum(2, keepdims=True)
    py = p[:, np.arange(5), y]
    np.testing.assert_allclose(fq.true_class_confidence(z, y), np.log(py / (1 - py)))
    extreme = fq.true_class_confidence(np.array([[[1000.0, 0.0]], [[0.0, 1000.0]]]), np.array([0]))
    np.testing.assert_allclose(extreme, [[1000.0], [-1000.0]])


def test_agreement_and_js():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 6, 5))
    assert fq.top1_agreement(a, a.copy()) == pytest.approx(
        np.mean([(a[i].argmax(1) == a[j].argmax(1)).mean() for i in range(4) for j in range(4)]))
    b = rng.normal(size=(3, 6, 5))
    brute = np.mean([(a[i].argmax(1) == b[j].argmax(1)).mean() for i in range(4) for j in range(3)])
    assert fq.top1_agreement(a, b) == pytest.approx(brute)
    assert fq.js_divergence(a, a.copy()) == pytest.approx(0.0, abs=1e-12)
    one = np.full((2, 3, 2), [50.0, 0.0])
    two = np.full((2, 3, 2), [0.0, 50.0])
    assert fq.top1_agreement(one, two) == 0.0
    assert fq.js_divergence(one, two) == pytest.approx(1.0, abs=1e-9)


# --- report and validation -----------------------------------------------------------------


def test_report_floor_and_identical():
    rng = np.random.default_rng(0)
    n, k = 12, 5
    labels = np.zeros(n, dtype=int)
    retrained = rng.normal(size=(8, n, k)) + np.array([-6.0, 3, 0, 0, 0])
    kept = rng.normal(size=(8, n, k)) + np.array([6.0, 0, 0, 0, 0])
    rep = fq.forgetting_report(kept, retrained, labels)
    assert rep["forgetting_score"] == 0.0 and rep["epsilon_capped_fraction"] == 1.0
    assert rep["top1_agreement"] == 0.0 and rep["js_divergence"] > 0.9
    assert (rep["n_unlearned"], rep["n_retrained"], rep["n_examples"], rep["ceiling_n"]) == (8, 8, n, 4)
    same = rng.normal(size=(8, n, k)) + np.array([-6.0, 3, 0, 0, 0])
    rep2 = fq.forgetting_report(same, retrained, labels, rng_seed=3)
    assert rep2["forgetting_score"] > 0 and rep2["js_divergence"] < 0.05
    assert rep2["max_finite_epsilon"] == pytest.approx(fq.max_finite_epsilon(8))
    assert set(rep2) >= {"epsilon_mean", "epsilon_median", "ceiling", "forgetting_score_at_ceiling_n"}


def test_paired_report_scores_exact_retraining_at_the_ceiling():
    """Unlearned models equal to their own seed's retrained twin (exact unlearning): the matched
    score meets only the other seeds' retrained models, so it is the ceiling, to the last bit; the
    full-N score compares identical sets (epsilon 0, F = 1)."""
    rng = np.random.default_rng(1)
    retrained = rng.normal(size=(12, 30, 4)) + np.array([-2.0, 1, 0, 0])
    labels = np.zeros(30, dtype=int)
    for seed in range(3):
        rep = fq.forgetting_report(retrained.copy(), retrained, labels, rng_seed=seed, paired=True)
        assert rep["forgetting_score_at_ceiling_n"] == rep["ceiling"]
        assert rep["forgetting_score"] == 1.0 and rep["epsilon_mean"] == 0.0
    shifted = retrained + np.array([1.5, 0, 0, 0])
    rep = fq.forgetting_report(shifted, retrained, labels, paired=True)
    assert rep["forgetting_score_at_ceiling_n"] < rep["ceiling"]
    with pytest.raises(ValueError, match="paired sets need as many"):
        fq.forgetting_report(retrained[:8], retrained, labels, paired=True)


@pytest.mark.parametrize("u, r, match", [
    (np.zeros((4, 3)), np.zeros((4, 2)), "same number of examples"),
    (np.zeros((1, 3)), np.zeros((4, 3)), "at least 2 models"),
    (np.zeros(3), np.zeros((4, 3)), "2-D"),
    (np.full((4, 3), np.nan), np.zeros((4, 3)), "finite"),
])
def test_per_example_epsilon_rejects_bad_inputs(u, r, match):
    with pytest.raises(ValueError, match=match):
        fq.per_example_epsilon(u, r)


def test_other_validation():
    with pytest.raises(ValueError, match="delta"):
        fq.per_example_epsilon(np.zeros((2, 1)), np.ones((2, 1)), delta=0.0)
    with pytest.raises(ValueError, match="at least 4"):
        fq.ceiling(np.zeros((3, 2)), 0)
    with pytest.raises(ValueError, match="labels"):
        fq.true_class_confidence(np.zeros((2, 3, 4)), np.array([0, 1, 4]))
    with pytest.raises(ValueError, match="examples, classes"):
        fq.top1_agreement(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="non-negative"):
        fq.example_scores([0.1, np.nan])
