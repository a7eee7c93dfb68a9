"""The forgetting-quality benchmark's runner (dkvb.forgetting_eval) on a tiny synthetic problem."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dkvb.config import ExperimentConfig, MethodConfig
from dkvb.experiment import expand_method_list, method_from_label
from dkvb.forgetting_eval import ForgettingConfig, measure_forgetting, train_family
from dkvb.models import ModelConfig
from dkvb.train import TrainConfig

from conftest import make_clusters

pytestmark = pytest.mark.slow


def _config() -> ExperimentConfig:
    return ExperimentConfig(name="fq", forget=[[1]],
                            model=ModelConfig(num_codebooks=8, codebook_size=16, key_dim=4, projection="random"),
                            train=TrainConfig(epochs=3, lr=1e-2), linear_train=TrainConfig(epochs=3, lr=1e-2))


def test_scores_every_method_against_its_own_family_and_resumes(tmp_path, monkeypatch):
    train, test = make_clusters(600, dim=16, num_classes=4, seed=0), make_clusters(200, dim=16, num_classes=4, seed=1)
    methods = [MethodConfig("dkvb-activations"), MethodConfig("dkvb-drop-output"), MethodConfig("drop-output"),
               MethodConfig("retrain", params={"epochs": [3], "lr": [1e-2]})]
    fcfg = ForgettingConfig(num_models=4, methods=methods)
    result = measure_forgetting(_config(), train, test, fcfg, tmp_path)
    mean = result["mean"]
    assert set(mean) == {"original (dkvb)", "original (linear)", "dkvb-activations", "dkvb-drop-output", "drop-output",
                         "retrain[epochs=3,lr=0.01]"}
    assert mean["dkvb-activations"]["family"] == "dkvb" and mean["drop-output"]["family"] == "linear"
    # retraining with the same recipe and seeds is the retrained set itself: nothing told apart
    same = mean["retrain[epochs=3,lr=0.01]"]
    assert same["F"] == 1.0 and same["js"] == pytest.approx(0.0, abs=1e-6)
    # the original kept the class: its forget images are told apart (with 4 models an attacker's
    # epsilon saturates at log 3, which still scores 0.25, the floor at this N)
    assert mean["original (linear)"]["F"] <= 0.25 and mean["original (linear)"]["forget_test_acc"] > 0.5
    assert mean["drop-output"]["forget_test_acc"] == 0.0 and mean["dkvb-drop-output"]["forget_test_acc"] == 0.0
    assert sorted(p.name for p in tmp_path.glob("seed-*.pt")) == [f"seed-{s}.pt" for s in range(4)]

    # resuming reads the saved seeds: no model is trained again
    def no_training(*a, **k):
        raise AssertionError("a finished seed was run again")

    monkeypatch.setattr("dkvb.forgetting_eval.run_seed", no_training)
    again = measure_forgetting(_config(), train, test, fcfg, tmp_path)
    assert again["mean"] == result["mean"]
    # fewer methods on the same seeds: only those (and the originals) are scored
    fewer = measure_forgetting(_config(), train, test, ForgettingConfig(num_models=4, methods=methods[2:3]), tmp_path)
    assert set(fewer["mean"]) == {"original (dkvb)", "original (linear)", "drop-output"}
    assert fewer["mean"]["drop-output"] == result["mean"]["drop-output"]


def test_a_retrained_dkvb_has_the_originals_codebook_size():
    """``auto`` sizes resolve from the original training set, also for a model retrained on fewer rows
    (1,300 rows give 64 keys per codebook; the 975 retain rows alone would give 32)."""
    cfg = replace(_config(), model=ModelConfig(num_codebooks=8, codebook_size="auto", key_dim=4, projection="random"))
    train = make_clusters(1300, dim=16, num_classes=4, seed=0)
    retain = train.subset(~train.class_mask((1,)))
    assert len(retain) < 1280
    original = train_family(cfg, "dkvb", train, 0)
    retrained = train_family(cfg, "dkvb", retain, 0, size_from=len(train))
    assert original.bottleneck.codebook_size == retrained.bottleneck.codebook_size == 64
    assert train_family(cfg, "dkvb", retain, 0).bottleneck.codebook_size == 32


def test_needs_four_models_for_a_ceiling():
    with pytest.raises(ValueError, match="num_models"):
        ForgettingConfig(num_models=3)


@pytest.mark.parametrize("label", ["dkvb-activations[min_share=0,floor_scores=0.3]", "dkvb-drop-output", "rbm",
                                   "scrub[lr=0.002,epochs=3,msteps=2,alpha=0.001,gamma=0.99,temperature=4.0]",
                                   "dkvb-activations[refit_epochs=2,release_keys=True]"])
def test_a_method_label_names_the_run_it_came_from(label):
    method = method_from_label(label)
    assert [run for run, *_ in expand_method_list([method])] == [label]


@pytest.mark.parametrize("label", ["", "rbm[", "rbm[lr]", "a b"])
def test_a_malformed_method_label_is_refused(label):
    with pytest.raises(ValueError, match="method label"):
        method_from_label(label)


@pytest.mark.parametrize("values", ["counts", "ridge"])
def test_keys_from_a_disjoint_pool_make_a_count_request_exactly_retraining(values):
    """Keys and projection fitted on a pool no request touches, count or ridge values: the request's
    recount or solve (no mask) gives the model retrained without the class, to float rounding, on
    every input."""
    from dkvb.unlearn import ForgetRequest, create_unlearner

    cfg = replace(_config(), model=ModelConfig(num_codebooks=8, codebook_size=16, key_dim=4, projection="whitened"),
                  train=TrainConfig(epochs=0, value_init=values))
    train, test = make_clusters(600, dim=16, num_classes=4, seed=0), make_clusters(200, dim=16, num_classes=4, seed=1)
    pool = make_clusters(500, dim=16, num_classes=6, seed=2)
    original = train_family(cfg, "dkvb", train, 0, key_pool=pool)
    request = ForgetRequest((1,), train, seed=0)
    unlearned = create_unlearner("dkvb-activations", mask_keys=False).unlearn(original, request).model
    retrained = train_family(cfg, "dkvb", request.retain, 0, size_from=len(train), key_pool=pool)
    assert torch.equal(unlearned.bottleneck.keys, retrained.bottleneck.keys)
    assert (unlearned(test.x) - retrained(test.x)).abs().max() <= 1e-6
    # keys fitted on the training set differ once the class is gone: the recount is then not retraining
    own = train_family(cfg, "dkvb", train, 0)
    own_unlearned = create_unlearner("dkvb-activations", mask_keys=False).unlearn(own, request).model
    own_retrained = train_family(cfg, "dkvb", request.retain, 0, size_from=len(train))
    assert not torch.equal(own_unlearned(test.x), own_retrained(test.x))


@pytest.mark.parametrize("values", ["counts", "ridge"])
def test_the_benchmark_scores_exact_unlearning_at_its_ceiling(tiny_config, tmp_path, values):
    """A config with a key pool and count or ridge values, end to end from images: the recount alone
    is the retrained model, so F at the full N is 1 and F at the ceiling's N is the ceiling itself."""
    from dkvb.config import load_config
    from dkvb.experiment import load_embeddings

    cfg = load_config(tiny_config, ["key_pool.name=sklearn-digits", "key_pool.train_limit=300",
                                    "model.projection=whitened", f"train.value_init={values}", "train.epochs=0",
                                    "forget=[[class1]]"])
    train, test = load_embeddings(cfg, progress=False)
    methods = [MethodConfig("dkvb-activations", params={"mask_keys": [False]}), MethodConfig("dkvb-activations")]
    result = measure_forgetting(cfg, train, test, ForgettingConfig(num_models=4, methods=methods), tmp_path)
    exact = result["mean"]["dkvb-activations[mask_keys=False]"]
    assert exact["F"] == 1.0 and exact["F_test"] == 1.0
    assert exact["F_at_ceiling_n"] == exact["ceiling"] and exact["F_test_at_ceiling_n"] == exact["ceiling_test"]
    assert exact["forget_test_acc"] == 0.0
