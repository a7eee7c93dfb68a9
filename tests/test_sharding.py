"""SISA-style sharded exact unlearning: which shards are retrained, what it costs, and the store round trip."""
import copy

import pytest
import torch

from dkvb import ForgetRequest, TrainConfig, build_model, create_unlearner, evaluate
from dkvb.flops import FlopCounter
from dkvb.models import ShardedEnsemble
from dkvb.shards import train_sharded
from dkvb.store import load_model, save_model
from dkvb.train import DivergenceError

RECIPE = TrainConfig(epochs=8, lr=1e-2)
STEP = 3 * 32 * 5  # FLOPs of one example's forward + backward through a 32 -> 5 linear head


@pytest.fixture(scope="module")
def by_class(clusters):
    return train_sharded({"kind": "linear"}, clusters[0], RECIPE, 3, assignment="class", seed=0)


@pytest.fixture(scope="module")
def by_random(clusters):
    return train_sharded({"kind": "linear"}, clusters[0], RECIPE, 4, seed=0)


def shard_states(ensemble):
    return [{k: v.clone() for k, v in shard.state_dict().items()} for shard in ensemble.shards]


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_experiment_call_trains_disjoint_shards_and_counts_flops(clusters):
    train, test = clusters
    counter = FlopCounter()
    ensemble = train_sharded({"kind": "linear"}, train, RECIPE, seed=0, flops=counter, **{"num_shards": 5})
    assert ensemble.num_shards == 5 and ensemble.config["kind"] == "sharded"
    assert sorted(ensemble.assignment.unique().tolist()) == list(range(5))
    sizes = torch.bincount(ensemble.assignment, minlength=5)
    assert sizes.max() - sizes.min() <= 5  # class-stratified round robin
    assert counter.total == RECIPE.epochs * len(train) * STEP
    m = evaluate(ensemble, train, test, [0])
    assert m["retain_test_acc"] >= 0.97 and m["forget_test_acc"] >= 0.97


@pytest.mark.parametrize("classes", [(1,), (0, 4)])
def test_class_shards_retrain_exactly_the_owners(clusters, by_class, classes):
    train, test = clusters
    owners = sorted({int(by_class.class_owner[:, c].nonzero()) for c in classes})
    before = shard_states(by_class)
    report = create_unlearner("sharded").unlearn(by_class, ForgetRequest(classes, train))
    assert report.details["retrained_shards"] == owners
    after = shard_states(report.model)
    for s in range(by_class.num_shards):
        assert same(after[s], before[s]) == (s not in owners)  # untouched shards are bit-identical
    assert all(same(now, old) for now, old in zip(shard_states(by_class), before))  # input untouched
    held = int(torch.isin(by_class.assignment, torch.tensor(owners)).sum())
    kept = held - int(train.class_mask(classes).sum())
    assert report.details["examples_retrained_on"] == kept
    assert report.flops == RECIPE.epochs * kept * STEP
    retain = len(train) - int(train.class_mask(classes).sum())
    assert report.details["retrain_fraction"] == pytest.approx(kept / retain)
    m = evaluate(report.model, train, test, classes)
    assert m["forget_train_acc"] <= 0.05 and m["forget_test_acc"] <= 0.05
    assert m["retain_test_acc"] >= 0.9


def test_random_shards_all_hold_a_class_so_all_are_retrained(clusters, by_random):
    train, test = clusters
    report = create_unlearner("sharded").unlearn(by_random, ForgetRequest((2,), train))
    assert report.details["retrained_shards"] == [0, 1, 2, 3]
    assert report.details["examples_retrained_on"] == 1600 and report.details["retrain_fraction"] == 1.0
    m = evaluate(report.model, train, test, [2])
    assert m["forget_test_acc"] <= 0.05 and m["retain_test_acc"] >= 0.97


def test_a_shard_emptied_by_unlearning_is_deactivated(clusters):
    train, test = clusters
    ensemble = train_sharded({"kind": "linear"}, train, TrainConfig(epochs=1, lr=1e-2), 5, assignment="class")
    owner = int(ensemble.class_owner[:, 3].nonzero())
    report = create_unlearner("sharded").unlearn(ensemble, ForgetRequest((3,), train))
    assert report.details["emptied_shards"] == [owner] and not report.model.active[owner]
    assert bool(ensemble.active.all())
    m = evaluate(report.model, train, test, [3])
    assert m["forget_test_acc"] == 0 and m["retain_test_acc"] >= 0.9


def test_same_seed_same_shards(clusters, by_class):
    train, _ = clusters
    again = train_sharded({"kind": "linear"}, train, RECIPE, 3, assignment="class", seed=0)
    assert torch.equal(again.assignment, by_class.assignment)
    assert all(same(a, b) for a, b in zip(shard_states(again), shard_states(by_class)))
    request = ForgetRequest((1,), train)
    a, b = (create_unlearner("sharded").unlearn(by_class, request) for _ in range(2))
    assert all(same(x, y) for x, y in zip(shard_states(a.model), shard_states(b.model)))


def test_bad_inputs_raise(clusters, by_class, trained_linear):
    train, _ = clusters
    with pytest.raises(ValueError, match="num_shards"):
        train_sharded({"kind": "linear"}, train, RECIPE, 6, assignment="class")
    with pytest.raises(ValueError, match="num_shards"):
        train_sharded({"kind": "linear"}, train, RECIPE, 0)
    with pytest.raises(ValueError, match="assignment"):
        train_sharded({"kind": "linear"}, train, RECIPE, 2, assignment="hash")
    with pytest.raises(ValueError, match="not the one this ensemble was trained on"):
        create_unlearner("sharded").unlearn(by_class, ForgetRequest((1,), train.subset(torch.arange(1000))))
    with pytest.raises(TypeError, match="sharded"):
        create_unlearner("sharded").unlearn(trained_linear, ForgetRequest((1,), train))


def test_divergent_retraining_raises_and_leaves_the_ensemble_unchanged(clusters, by_class):
    train, _ = clusters
    broken = copy.deepcopy(by_class)
    broken.train_config = {**broken.train_config, "epochs": 1, "lr": float("inf")}
    before = shard_states(broken)
    with pytest.raises(DivergenceError, match="sharded"):
        create_unlearner("sharded").unlearn(broken, ForgetRequest((1,), train))
    assert all(same(a, b) for a, b in zip(shard_states(broken), before))
    assert int((broken.assignment == -1).sum()) == 0


def test_store_round_trip(tmp_path, clusters, by_class):
    train, test = clusters
    save_model(by_class, tmp_path / "sharded", class_names=list(train.class_names), encoder="synthetic")
    loaded, manifest = load_model(tmp_path / "sharded", expect_encoder="synthetic", expect_dim=32)
    assert isinstance(loaded, ShardedEnsemble) and manifest["kind"] == "sharded"
    assert loaded.config == by_class.config
    assert torch.equal(loaded(test.x), by_class(test.x))
    report = create_unlearner("sharded").unlearn(loaded, ForgetRequest((1,), train))
    direct = create_unlearner("sharded").unlearn(by_class, ForgetRequest((1,), train))
    assert all(same(a, b) for a, b in zip(shard_states(report.model), shard_states(direct.model)))
    assert isinstance(build_model(by_class.config, 32, 5, seed=0), ShardedEnsemble)
