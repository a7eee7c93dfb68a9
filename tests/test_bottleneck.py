import pytest
import torch

from dkvb.bottleneck import DiscreteKeyValueBottleneck
from dkvb.flops import search_flops


def make(search="torch", topk=1, **kw):
    b = DiscreteKeyValueBottleneck(16, 6, 20, key_dim=4, value_dim=3, topk=topk, search=search, seed=0, **kw)
    b.init_keys(torch.randn(800, 16, generator=torch.Generator().manual_seed(0)))
    return b


def brute_force(b, x, k):
    z = b.project(x)  # (N, C, dk)
    d = ((z.unsqueeze(2) - b.keys.unsqueeze(0)) ** 2).sum(-1)  # (N, C, K)
    d = d.masked_fill(b.key_mask.unsqueeze(0), float("inf"))
    return d.topk(k, dim=-1, largest=False).indices


@pytest.mark.parametrize("search", ["torch", "faiss"])
@pytest.mark.parametrize("topk", [1, 3])
def test_selection_equals_brute_force_nearest_neighbour(search, topk):
    b = make(search, topk)
    x = torch.randn(50, 16)
    assert torch.equal(b.lookup(x), brute_force(b, x, topk))


@pytest.mark.parametrize("search", ["torch", "faiss"])
def test_masked_keys_are_never_selected_and_next_nearest_is(search):
    b = make(search)
    x = torch.randn(5, 16)
    first = b.lookup(x)
    b.key_mask[torch.arange(6).view(1, -1), first[:, :, 0]] = True  # mask every key picked above
    second = b.lookup(x)
    assert not b.key_mask[torch.arange(6).view(1, -1, 1), second].any()
    assert torch.equal(second, brute_force(b, x, 1))


def test_chunked_lookup_matches_unchunked():
    b = make()
    x = torch.randn(300, 16)
    full = b.lookup(x)
    b.chunk_rows = 7
    assert torch.equal(b.lookup(x), full)


def test_values_of_unselected_keys_receive_no_gradient():
    b = make()
    x = torch.randn(10, 16)
    out = b(x)
    out.values.sum().backward()
    selected = torch.zeros(6, 20, dtype=torch.bool)
    selected[torch.arange(6).view(1, -1), out.indices[:, :, 0]] = True
    grad_norm = b.values.grad.abs().sum(-1)
    assert (grad_norm[~selected] == 0).all()
    assert (grad_norm[selected] > 0).all()


def test_keys_and_projection_are_not_trainable():
    b = make()
    assert [n for n, _ in b.named_parameters()] == ["values"]


def test_same_seed_same_keys_different_seed_different_keys():
    x = torch.randn(800, 16, generator=torch.Generator().manual_seed(1))
    keys = []
    for seed in (0, 0, 1):
        b = DiscreteKeyValueBottleneck(16, 4, 10, key_dim=4, value_dim=2, seed=seed)
        b.init_keys(x)
        keys.append(b.keys.clone())
    assert torch.equal(keys[0], keys[1])
    assert not torch.equal(keys[0], keys[2])


@pytest.mark.parametrize("projection", ["pca", "whitened"])
def test_fitted_projections_initialise(projection):
    b = DiscreteKeyValueBottleneck(16, 6, 20, key_dim=4, value_dim=3, projection=projection, whiten_dim=8)
    b.init_keys(torch.randn(800, 16))
    assert b.projection.shape == ((8 if projection == "whitened" else 16), 6, 4)
    assert torch.isfinite(b.projection).all() and torch.isfinite(b.whitening).all()


def test_whitened_projection_gives_every_kept_direction_unit_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g) * torch.logspace(0, 3, 16)  # variances spanning 6 decades
    b = DiscreteKeyValueBottleneck(16, 64, 20, key_dim=4, value_dim=3, projection="whitened", whiten_dim=16)
    b.init_keys(x)
    z = b.project(x - x.mean(0)).flatten(1)  # (N, C * key_dim) = white(x) @ gaussian
    # with whitened inputs, z's covariance is rand.T @ rand: its diagonal averages 1
    assert abs(float(z.var(0).mean()) - 1.0) < 0.1


def _separable_in_a_weak_direction(n: int = 3000):
    """Three classes that differ only along a low-variance direction, under 15 loud noise ones."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = torch.randn(n, 16, generator=g) * torch.cat([torch.full((15,), 10.0), torch.tensor([0.3])])
    x[:, 15] += y.float()
    return x, y


def test_discriminant_projection_puts_the_class_direction_first_and_scaled():
    x, y = _separable_in_a_weak_direction()
    b = DiscreteKeyValueBottleneck(16, 8, 6, key_dim=2, value_dim=3, projection="discriminant", whiten_dim=6,
                                   discriminant_weight=3.0, discriminant_shrinkage=0.0)  # plain LDA
    b.init_keys(x, y)
    lda = b.whitening[:, :2]  # 3 classes: 2 discriminant directions, then 4 whitened ones
    assert torch.allclose(((x - x.mean(0)) @ lda).std(0), torch.full((2,), 3.0), atol=1e-3)
    first = lda[:, 0] / lda[:, 0].norm()
    assert abs(float(first[15])) > 0.99  # the only direction that separates the classes
    # the keys see it: one codebook's keys split the classes far better than a whitened bottleneck's
    w = DiscreteKeyValueBottleneck(16, 8, 6, key_dim=2, value_dim=3, projection="whitened", whiten_dim=6)
    w.init_keys(x)

    def purity(bn):
        counts = bn.activation_counts(x, y, 3).float()  # (3, C, K)
        return float(counts.max(0).values.sum() / counts.sum())

    assert purity(b) > purity(w) + 0.2


def test_discriminant_projection_needs_the_labels():
    x, _ = _separable_in_a_weak_direction(300)
    b = DiscreteKeyValueBottleneck(16, 4, 6, key_dim=2, value_dim=3, projection="discriminant", whiten_dim=6)
    with pytest.raises(ValueError, match="needs the training labels"):
        b.init_keys(x)


def test_discriminant_projection_survives_an_eigh_failure(monkeypatch, caplog):
    """Where ``torch.linalg.eigh`` refuses a degenerate matrix (seen once on a 16-core AVX-512
    machine), scipy's MRRR driver gives the same projection, column signs aside."""
    from dkvb.keys import _discriminant

    x, y = _separable_in_a_weak_direction(300)
    expected = _discriminant(x, y, 6, weight=4.0, shrinkage="auto")

    def refuse(m):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", refuse)
    got = _discriminant(x, y, 6, weight=4.0, shrinkage="auto")
    assert torch.allclose(got.abs(), expected.abs(), atol=1e-4)
    assert "using scipy's evr driver" in caplog.text


def test_activation_counts_sum_to_number_of_lookups():
    b = make(topk=2)
    x, y = torch.randn(90, 16), torch.arange(90) % 3
    counts = b.activation_counts(x, y, 3)
    assert counts.shape == (3, 6, 20)
    assert torch.equal(counts.sum((1, 2)), torch.tensor([30 * 6 * 2] * 3))
    # each class's count of each key is how many of its rows select the key, counted by chunks of
    # rows or from a kept search alike
    codes = b.lookup(x)
    direct = torch.zeros(3, 6, 20, dtype=torch.long)
    for row, label in zip(codes, y):
        direct[label].scatter_add_(1, row, torch.ones_like(row))
    assert torch.equal(counts, direct)
    b.chunk_rows = 7
    assert len(b.chunks(90)) > 1
    assert torch.equal(b.activation_counts(x, y, 3), direct)
    assert torch.equal(b.activation_counts(x, y, 3, candidates=b.candidates(x)), direct)


@pytest.mark.parametrize("bad, rule", [
    (dict(num_codebooks=0), ">= 1"), (dict(topk=30), "<= codebook_size=20"),
    (dict(projection="learned"), "one of 'random', 'pca', 'whitened', 'discriminant'"),
    (dict(discriminant_shrinkage=1.5), "'auto' or in [0, 1]"), (dict(discriminant_weight=0.0), "> 0"), (dict(search="x"), "one of 'torch', 'faiss'"),
])
def test_invalid_arguments_are_rejected(bad, rule):
    kw = dict(dim=16, num_codebooks=4, codebook_size=20, value_dim=3) | bad
    (name, value), = bad.items()
    with pytest.raises(ValueError) as info:
        DiscreteKeyValueBottleneck(**kw)
    assert str(info.value) == f"DiscreteKeyValueBottleneck: {name} must be {rule}, got {value!r}"


def test_bad_input_is_rejected_with_clear_errors():
    b = make()
    with pytest.raises(ValueError, match="wrong embedding size"):
        b.lookup(torch.randn(3, 17))
    with pytest.raises(ValueError, match="NaN or inf"):
        b.lookup(torch.full((2, 16), float("nan")))
    with pytest.raises(RuntimeError, match="not initialised"):
        DiscreteKeyValueBottleneck(16, 2, 4, value_dim=2).lookup(torch.randn(2, 16))
    with pytest.raises(ValueError, match="at least codebook_size"):
        DiscreteKeyValueBottleneck(16, 2, 50, value_dim=2).init_keys(torch.randn(10, 16))
    b.key_mask[2] = True
    with pytest.raises(RuntimeError, match="codebook 2 has fewer than 1 unmasked"):
        b.lookup(torch.randn(2, 16))


def test_empty_batch_gives_empty_indices():
    assert make().lookup(torch.empty(0, 16)).shape == (0, 6, 1)


@pytest.mark.parametrize("topk", [1, 3])
def test_selection_from_candidates_equals_a_fresh_search_under_random_masks(topk):
    b = make(topk=topk)
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(2))
    cands = b.candidates(x, extra=4)
    g = torch.Generator().manual_seed(3)
    for share in (0.0, 0.1, 0.3, 0.6, 0.8):
        b.key_mask.copy_(torch.rand(6, 20, generator=g) < share)
        b.key_mask[:, :topk] = False  # keep every codebook selectable
        assert torch.equal(b.select(x, cands), b.lookup(x))
    b.key_mask.zero_()
    assert torch.equal(b.select(x, cands), b.lookup(x))


def test_candidates_searched_under_a_mask_are_redone_after_an_unmask():
    b = make()
    x = torch.randn(50, 16)
    b.key_mask[:, 5] = True
    cands = b.candidates(x, extra=2)
    b.key_mask.zero_()
    assert torch.equal(b.select(x, cands), b.lookup(x))


def test_cpu_search_equals_the_batched_matmul_search():
    b = make(topk=2)
    x = torch.randn(64, 16)
    b.key_mask[:, ::3] = True
    z = b.project(x)
    knorm = b.keys.pow(2).sum(-1).masked_fill(b.key_mask, float("inf"))
    d = torch.bmm(z.transpose(0, 1), b.keys.transpose(1, 2)).mul_(-2).add_(knorm.unsqueeze(1))
    assert torch.equal(b.lookup(x), d.topk(2, dim=-1, largest=False).indices.permute(1, 0, 2))


def test_pool_is_the_mean_of_the_selected_values():
    b = make(topk=2)
    torch.nn.init.normal_(b.values)
    idx = b.lookup(torch.randn(7, 16))
    assert torch.allclose(b.pool(b.flat_indices(idx)), b.get_output_from_indices(idx).mean(1), atol=1e-6)


def test_candidates_of_other_embeddings_are_refused():
    b = make()
    cands = b.candidates(torch.randn(10, 16))
    with pytest.raises(ValueError, match="candidates for \\(10, 6\\)"):
        b.select(torch.randn(9, 16), cands)


def pair_search_flops(b, kept, mask, length):
    """What refresh should count, derived here from the definitions: each (row, codebook) pair with
    fewer than topk of its kept keys unmasked is searched; a codebook's pairs take one product of
    at least MIN_ROWS rows with a slab of at least MIN_COLS projection columns, one with the
    codebook's keys, and one comparison per key and pair."""
    from dkvb.selection import MIN_COLS, MIN_ROWS

    flat = kept.long()
    free = ((flat >= 0) & ~mask.flatten()[flat.clamp_min(0)]).sum(-1)  # (N, C)
    per_codebook = (free < b.topk).sum(0).tolist()
    in_dim, cols = b.projection.shape[0], b.num_codebooks * b.key_dim
    width = min(cols, max(MIN_COLS, b.key_dim))
    return sum(max(n, MIN_ROWS) * (in_dim * width + b.key_dim * b.codebook_size) + n * b.codebook_size
               for n in per_codebook if n)


@pytest.mark.parametrize("projection", ["random", "whitened"])
@pytest.mark.parametrize("topk", [1, 3])
def test_refreshed_candidates_select_what_a_fresh_search_does_as_masks_grow(topk, projection):
    """refresh re-searches only the (row, codebook) pairs a mask leaves without kept keys, from the
    whitened rows and that codebook's projection alone, and gets lookup's keys bit for bit; its
    FLOPs are exactly those computations'."""
    b = make(topk=topk, projection=projection, whiten_dim=12)
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(4))
    base = b.whiten_rows(x)
    assert base.shape == ((400, 12) if projection == "whitened" else (400, 16))
    g = torch.Generator().manual_seed(5)
    cands = b.candidates(base, extra=0, whitened=True)  # what compute_activation_counts keeps: topk only
    assert torch.equal(b.codes(cands), b.lookup(x))
    for share in (0.05, 0.1, 0.3, 0.6, 0.8):  # each mask contains the last, as requests accumulate
        b.key_mask |= torch.rand(6, 20, generator=g) < share
        b.key_mask[:, :topk] = False
        expected = pair_search_flops(b, cands.indices, b.key_mask, topk + 2)
        cands, flops = b.refresh(base, cands, topk + 2)
        assert cands.indices.shape == (400, 6, topk + 2) and flops == expected > 0
        assert torch.equal(b.codes(cands), b.lookup(x))
        assert torch.equal(b.select(x, cands), b.lookup(x))
    b.key_mask.zero_()  # an unmask falls back to a fresh search of every row
    cands, flops = b.refresh(base, cands, topk + 2)
    assert torch.equal(b.codes(cands), b.lookup(x)) and flops == search_flops(b, 400, whitened=True)


def test_a_search_chunks_rows_evenly():
    """No chunk is left with a few rows (BLAS kernels round a few rows differently)."""
    b = DiscreteKeyValueBottleneck(16, 6, 20, key_dim=4, value_dim=3, chunk_rows=100)
    assert b.chunks(0) == [] and b.chunks(100) == [(0, 100)]
    assert b.chunks(201) == [(0, 67), (67, 134), (134, 201)]


@pytest.mark.parametrize("topk", [1, 3])
def test_selection_of_the_rows_a_change_reaches_equals_a_fresh_search(topk):
    """select_flat(..., changed) returns the rows whose kept selection holds a changed key, with
    what a fresh search gives them; every other row's fresh search is its kept selection."""
    import numpy as np

    b = make(topk=topk)
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(2))
    cands = b.candidates(x, extra=2)  # few candidates: heavy masks leave (row, codebook) pairs without any
    kept = b.flat_indices(b.lookup(x))
    g = torch.Generator().manual_seed(4)
    for share in (0.02, 0.2, 0.5, 0.8):
        b.key_mask.copy_(torch.rand(6, 20, generator=g) < share)
        b.key_mask[:, :topk] = False
        changed = b.key_mask.flatten().numpy() | (torch.rand(6 * 20, generator=g) < 0.05).numpy()
        rows, flat = b.select_flat(x, cands, changed)
        fresh = b.flat_indices(b.lookup(x))
        assert torch.equal(flat, fresh[rows])
        others = np.setdiff1d(np.arange(400), rows.numpy())
        assert torch.equal(fresh[others], kept[others])
        assert not changed[kept[others].numpy()].any()
        assert torch.equal(b.select_flat(x, cands), fresh)
    with pytest.raises(ValueError, match="every key masked since"):
        b.select_flat(x, cands, np.zeros(6 * 20, dtype=bool))


@pytest.mark.parametrize("bag", [1, 3, 96, 250, 256])
def test_pooling_equals_embedding_bags_mean_bit_for_bit(bag):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(bag)
    weight = torch.randn(bag * 40, 7, generator=g)
    flat = torch.randint(0, bag * 40, (300, bag), generator=g)
    b = DiscreteKeyValueBottleneck(16, bag, 40, value_dim=7)
    assert torch.equal(b.pool(flat, weight), F.embedding_bag(flat, weight, mode="mean"))


def test_projection_moments_do_not_depend_on_the_chunk_size(monkeypatch):
    """The whitening and discriminant projections sum their scatter matrices a chunk of rows at a
    time (no full float64 copy of an ImageNet-size set); the chunking must not change them."""
    import dkvb.keys as keys

    x, y = _separable_in_a_weak_direction(300)
    whole = keys._discriminant(x, y, 6, weight=4.0, shrinkage="auto")
    monkeypatch.setattr(keys, "MOMENT_ROWS", 7)
    assert torch.allclose(keys._discriminant(x, y, 6, weight=4.0, shrinkage="auto"), whole, atol=1e-5)
    assert ((x - x.mean(0)) @ whole[:, :2]).std(0).allclose(torch.full((2,), 4.0), atol=1e-3)


def test_kmeans_on_a_set_larger_than_faiss_samples_is_seeded():
    """Past ``codebook_size * max_points_per_centroid`` rows the keys are fitted on a seeded sample
    (projecting every row onto every codebook would not fit in memory at ImageNet size)."""
    x = torch.randn(1500, 16)

    def keys(seed):
        b = DiscreteKeyValueBottleneck(16, 3, 4, key_dim=2, value_dim=3, projection="random", seed=seed)
        b.init_keys(x, max_points_per_centroid=64)  # 4 keys x 64 points: a 256-row sample
        return b.keys.clone()

    assert torch.equal(keys(0), keys(0)) and not torch.equal(keys(0), keys(1))


def test_flat_indices_keep_int32_and_widen_smaller_types():
    b = make(topk=1)
    codes = torch.full((2, b.num_codebooks, 1), b.codebook_size - 1)
    expected = (torch.arange(b.num_codebooks) + 1) * b.codebook_size - 1
    for dtype, out in [(torch.int64, torch.int64), (torch.int32, torch.int32), (torch.int16, torch.int64),
                       (torch.uint8, torch.int64)]:
        flat = b.flat_indices(codes.to(dtype))
        assert flat.dtype == out and torch.equal(flat[0].long(), expected)
