import pytest
import torch
import torch.nn.functional as F

from dkvb import EmbeddingSet, ModelConfig, TrainConfig, build_model, fit
from dkvb.evaluate import accuracy, predict_logits
from dkvb.train import LazyAdam


def teacher(n: int, seed: int) -> EmbeddingSet:
    """A 5-class problem labelled by a noisy linear teacher: accuracy is well below 100%."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 5, generator=g)
    g.manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x @ w + 0.3 * torch.randn(n, 5, generator=g) * w.norm(dim=0)).argmax(1)
    return EmbeddingSet(x, y, [str(i) for i in range(5)])


@pytest.fixture(scope="module")
def data():
    return teacher(6000, 0), teacher(3000, 1)


CFG = ModelConfig(num_codebooks=32, codebook_size=64, key_dim=4, topk=2)


def trained(train, **fit_kw):
    model = build_model(CFG, train.dim, train.num_classes, seed=0)
    return fit(model, train, TrainConfig(epochs=8, lr=0.01, seed=0), **fit_kw)


def test_fast_values_training_matches_the_dense_adam_loop(data):
    train, test = data
    fast = accuracy(predict_logits(trained(train), test.x), test.y)
    dense = accuracy(predict_logits(trained(train, loss_fn=lambda m, x, y: F.cross_entropy(m(x), y)), test.x), test.y)
    assert 0.5 < dense < 0.95  # a problem the models do not solve perfectly
    assert abs(fast - dense) <= 0.003


def test_values_training_is_deterministic(data):
    train, _ = data
    assert torch.equal(trained(train).bottleneck.values, trained(train).bottleneck.values)


def test_lazy_adam_equals_torch_sparse_adam():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(50, 3, generator=g)
    ours, ref = w0.clone(), w0.clone().requires_grad_(True)
    lazy = LazyAdam(ours, lr=0.05)
    sparse = torch.optim.SparseAdam([ref], lr=0.05)
    for _ in range(5):
        bags = torch.randint(0, 50, (8, 4), generator=g)
        target = torch.randn(8, 3, generator=g)
        out = F.embedding_bag(bags, ref, mode="mean", sparse=True)
        loss = ((out - target) ** 2).sum()
        sparse.zero_grad()
        loss.backward()
        sparse.step()
        pooled = F.embedding_bag(bags, ours, mode="mean")
        lazy.step(bags, 2 * (pooled - target))
    assert torch.allclose(ours, ref.detach(), atol=1e-5)


def test_lazy_adam_leaves_untouched_rows_alone():
    w = torch.randn(10, 2)
    before = w.clone()
    LazyAdam(w, lr=0.1, weight_decay=0.5).step(torch.tensor([[1, 2]]), torch.ones(1, 2))
    assert torch.equal(w[3:], before[3:]) and not torch.equal(w[1:3], before[1:3])


def test_lazy_adam_freezes_rows_outside_trainable():
    w = torch.randn(10, 2)
    before = w.clone()
    trainable = torch.zeros(10, dtype=torch.bool)
    trainable[2] = True
    LazyAdam(w, lr=0.1, trainable=trainable).step(torch.tensor([[1, 2]]), torch.ones(1, 2))
    assert torch.equal(w[:2], before[:2]) and torch.equal(w[3:], before[3:]) and not torch.equal(w[2], before[2])


def test_training_from_looked_up_keys_equals_training_that_looks_them_up(data):
    train, _ = data
    model = build_model(CFG, train.dim, train.num_classes, seed=0)
    model.prepare(train.x, train.y)
    cands = model.bottleneck.candidates(train.x)
    given = fit(model, train, TrainConfig(epochs=2, lr=0.01, seed=0), indices=model.bottleneck.select(train.x, cands))
    fresh = build_model(CFG, train.dim, train.num_classes, seed=0)
    fit(fresh, train, TrainConfig(epochs=2, lr=0.01, seed=0))
    assert torch.equal(given.bottleneck.values, fresh.bottleneck.values)
    with pytest.raises(ValueError, match="indices must be"):
        fit(fresh, train, TrainConfig(epochs=1), indices=torch.zeros(3, 32, 2, dtype=torch.long))


def test_auto_bottleneck_size_follows_the_training_set_size():
    from dkvb.models import resolve_config

    small = resolve_config(ModelConfig(num_codebooks="auto", codebook_size="auto"), 4_000)
    large = resolve_config(ModelConfig(num_codebooks="auto", codebook_size="auto"), 45_000)
    assert (small.num_codebooks, small.codebook_size) == (256, 128)
    assert (large.num_codebooks, large.codebook_size) == (512, 256)
    assert resolve_config(ModelConfig(num_codebooks=64), 45_000).num_codebooks == 64
    with pytest.raises(ValueError, match="num_codebooks must be resolved"):
        build_model(ModelConfig(num_codebooks="auto"), 16, 3)


def test_fit_without_a_config_trains_each_model_by_its_own_recipe():
    """``fit(model, data)`` is the recipe the shipped configs measured, not TrainConfig's field
    defaults (the linear head's): a DKVB 30 epochs at lr 0.01 from zero values."""
    from conftest import SMALL_DKVB, make_clusters

    from dkvb.train import DKVB_TRAIN, LINEAR_TRAIN, recipe

    train = make_clusters(600, num_classes=3, seed=0)
    dkvb = build_model(SMALL_DKVB, train.dim, 3, seed=0)
    mlp = build_model(ModelConfig(**{**SMALL_DKVB.__dict__, "decoder": "mlp", "value_dim": 8}), train.dim, 3, seed=0)
    linear = build_model({"kind": "linear"}, train.dim, 3, seed=0)
    assert recipe(dkvb) == DKVB_TRAIN and (DKVB_TRAIN.epochs, DKVB_TRAIN.lr, DKVB_TRAIN.value_init) == (30, 0.01, "zeros")
    assert recipe(mlp) == DKVB_TRAIN
    assert recipe(linear) == LINEAR_TRAIN == TrainConfig()
    fit(dkvb, train)
    again = fit(build_model(SMALL_DKVB, train.dim, 3, seed=0), train, DKVB_TRAIN)
    assert torch.equal(dkvb.bottleneck.values, again.bottleneck.values)
