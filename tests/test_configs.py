"""Every experiment YAML parses and names only registered datasets, encoders and methods."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dkvb import encoders
from dkvb.config import ExperimentConfig, load_config
from dkvb.datasets import list_datasets
from dkvb.experiment import expand_methods, method_model
from dkvb.unlearn import UNLEARNERS, create_unlearner

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
TUNED_SCRUB = json.loads((ROOT / "benchmarks" / "results" / "tune_scrub.json").read_text())


def test_there_are_experiments():
    names = {p.stem for p in EXPERIMENTS}
    assert {"tiny_synthetic", "fashion_mnist_effnet_lite0", "cifar10_effnet_lite0"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_config_is_valid(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == path.stem  # results go to <output_dir>/<file name>

    prefix, _, arg = cfg.dataset.name.partition(":")
    assert prefix in list_datasets(), f"{path.name}: unknown dataset {cfg.dataset.name!r}"
    assert bool(arg) == (prefix == "imagefolder"), f"{path.name}: {cfg.dataset.name!r}"  # paths may not exist here

    enc_prefix, _, enc_arg = cfg.encoder.name.partition(":")
    assert enc_prefix in encoders._BUILDERS, f"{path.name}: unknown encoder {cfg.encoder.name!r}"
    if enc_prefix == "torchvision":
        import torchvision

        assert enc_arg in torchvision.models.list_models(module=torchvision.models)
    if enc_prefix == "clip":
        import open_clip

        model, _, tag = enc_arg.partition("/")
        assert model in open_clip.list_models() and tag in open_clip.list_pretrained_tags_by_model(model)
    assert cfg.encoder.dtype in ("float32", "float16") and cfg.encoder.amp in (None, "bf16", "fp16")

    assert cfg.methods, f"{path.name}: no methods"
    for method in cfg.methods:
        assert method.name in UNLEARNERS, f"{path.name}: unknown method {method.name!r}"
        assert method_model(method) in ("dkvb", "linear", "sharded")
    for label, method, params in expand_methods(cfg):  # every swept value is a valid hyperparameter
        create_unlearner(method.name, **params)
    if any(method_model(m) == "sharded" for m in cfg.methods):
        assert cfg.sharded.get("num_shards", 0) >= 2, f"{path.name}: sharded method without sharded.num_shards"

    assert cfg.forget == "each" or (isinstance(cfg.forget, list) and all(isinstance(r, list) for r in cfg.forget))
    assert cfg.model.codebook_size == "auto" or cfg.model.codebook_size >= cfg.model.topk >= 1


def test_training_sections_default_to_their_own_recipes():
    """An experiment without a ``train`` section trains the DKVB by its recipe, and a partial
    section changes only what it names (not falling back to TrainConfig's linear-head defaults)."""
    from dkvb.train import DKVB_TRAIN, LINEAR_TRAIN

    assert (ExperimentConfig().train, ExperimentConfig().linear_train) == (DKVB_TRAIN, LINEAR_TRAIN)
    cfg = load_config(None, ["train.epochs=5", "linear_train.batch_size=64"])
    assert cfg.train == dataclasses.replace(DKVB_TRAIN, epochs=5)
    assert cfg.linear_train == dataclasses.replace(LINEAR_TRAIN, batch_size=64)
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['train.epoch'\]"):
        load_config(None, ["train.epoch=5"])


def test_overrides_win_over_the_file():
    cfg = load_config(EXPERIMENTS[0], ["train.epochs=1", "encoder.device=cuda", "forget=[[0]]"])
    assert (cfg.train.epochs, cfg.encoder.device, cfg.forget) == (1, "cuda", [[0]])


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_a_benchmark_table_carries_output_deletion_in_both_families(path):
    """Every config beside the tiny demo compares with the one-line baseline that forget accuracy
    alone cannot tell from unlearning: each family's output deleted."""
    from dkvb.experiment import method_model

    cfg = load_config(path)
    if cfg.name == "tiny_synthetic":
        pytest.skip("the tiny demo runs four methods")
    assert {method_model(m) for m in cfg.methods if m.name == "drop-output"} == {"linear", "dkvb"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_scrub_runs_the_setting_tune_scrub_chose(path):
    """Every config that runs SCRUB ships benchmarks/tune_scrub.py's choice: the cross-dataset one
    where there is one (configs without cached embeddings always), else the config's own."""
    cfg = load_config(path)
    runs = [m for m in cfg.methods if m.name == "scrub"]
    if not runs:
        pytest.skip("no SCRUB in this config")
    own = {t["config"]: t["chosen"] for t in TUNED_SCRUB["configs"]}
    expected = TUNED_SCRUB["common"] or own[cfg.name]
    assert expected and all(m.params == expected for m in runs)


def test_scrub_defaults_are_the_cross_dataset_choice():
    from dkvb.unlearn.scrub import SCRUB

    common = TUNED_SCRUB["common"]
    if common is None:
        pytest.skip("no setting forgot on every tuned config")
    defaults = {f.name: f.default for f in dataclasses.fields(SCRUB)}
    assert {k: defaults[k] for k in common} == common


def test_a_key_pool_is_another_dataset_or_the_rows_a_subset_leaves_out():
    """``key_pool`` is optional (keys on the training set), a dataset section when given, and may be
    the training dataset itself only when that is a subset (forget requests would touch a pool of
    training rows)."""
    assert load_config(None, []).key_pool is None
    cfg = load_config(None, ["dataset.name=cifar10", "key_pool.name=cifar100", "key_pool.train_limit=5000"])
    assert (cfg.key_pool.name, cfg.key_pool.train_limit) == ("cifar100", 5000)
    with pytest.raises(ValueError, match="key_pool.name.*dataset.train_limit"):
        load_config(None, ["dataset.name=cifar10", "key_pool.name=cifar10"])
    cfg = load_config(None, ["dataset.name=cifar10", "dataset.train_limit=4000", "key_pool.name=cifar10"])
    assert cfg.key_pool.name == cfg.dataset.name
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['key_pool.size'\]"):
        load_config(None, ["key_pool.size=3"])
