"""One validation message format everywhere: ``<where>: <parameter> must be <rule>, got <value>``."""
from __future__ import annotations

from pathlib import Path

import pytest

from dkvb import ModelConfig, TrainConfig
from dkvb.config import load_config
from dkvb.validate import invalid, require, require_choice, require_count
from dkvb.verify import ProbeConfig


def test_helpers_share_one_format():
    assert str(invalid("where", "p", "> 0", -1, " (note)")) == "where: p must be > 0, got -1 (note)"
    require(True, "w", "p", "anything", 0)
    with pytest.raises(ValueError, match=r"^w: p must be > 0, got nan$"):
        require(float("nan") > 0, "w", "p", "> 0", float("nan"))
    for bad in (0, True, 2.0, "3"):
        with pytest.raises(ValueError, match=rf"^w: n must be an integer >= 1, got {bad!r}$"):
            require_count("w", "n", bad)
    require_count("w", "n", 0, low=0)
    with pytest.raises(ValueError, match=r"^w: c must be one of 'a', 'b', got 'z'$"):
        require_choice("w", "c", "z", ("a", "b"))


@pytest.mark.parametrize("build, message", [
    (lambda: ModelConfig(kind="tree"), "ModelConfig: kind must be one of 'dkvb', 'linear', got 'tree'"),
    (lambda: ModelConfig(decoder="rnn"), "ModelConfig: decoder must be one of 'mean', 'mlp', got 'rnn'"),
    (lambda: TrainConfig(epochs=-1), "TrainConfig: epochs must be >= 0, got -1"),
    (lambda: TrainConfig(lr=0.0), "TrainConfig: lr must be > 0, got 0.0"),
    (lambda: TrainConfig(label_smoothing=1), "TrainConfig: label_smoothing must be in [0, 1), got 1"),
    (lambda: ProbeConfig(examples=0), "ProbeConfig: examples must be >= 1, got 0"),
    (lambda: ProbeConfig(max_steps=0), "ProbeConfig: max_steps must be >= 1, got 0"),
])
def test_configs_and_models_use_the_format(build, message):
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value) == message


def test_experiment_config_uses_the_format(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: c\n")
    with pytest.raises(ValueError, match=r"^config: name must be one folder name .*, got '\.\.'$"):
        load_config(path, ["name=.."])
    with pytest.raises(ValueError, match=r"^config: train\.epochs must be an integer, got 'many'$"):
        load_config(path, ["train.epochs=many"])
    with pytest.raises(ValueError, match=r"^config: train\.epochs must be an integer, got '1e3' \(YAML reads"):
        load_config(path, ["train.epochs=1e3"])
    with pytest.raises(ValueError, match=r"^TrainConfig: batch_size must be >= 1, got 0$"):
        load_config(path, ["train.batch_size=0"])


@pytest.mark.parametrize("name, params, message", [
    ("finetune", {"lr": "abc"}, "finetune: lr must be a number, got 'abc'"),
    ("finetune", {"epochs": 2.5}, "finetune: epochs must be an integer, got 2.5"),
    ("finetune", {"epochs": True}, "finetune: epochs must be an integer, got True"),
    ("finetune", {"optimizer": 3}, "finetune: optimizer must be text, got 3"),
    ("scrub", {"momentum": float("nan")}, "scrub: momentum must be a finite number, got nan"),
    ("scrub", {"lr": "1e99999"}, "scrub: lr must be a finite number, got '1e99999'"),
    ("dkvb-activations", {"num_keys": -1}, "dkvb-activations: num_keys must be an integer >= 1, got -1"),
    ("dkvb-activations", {"num_keys": "7"}, "dkvb-activations: num_keys must be an integer or null, got '7'"),
    ("dkvb-activations", {"erase_values": "yes"}, "dkvb-activations: erase_values must be true or false, got 'yes'"),
    ("dkvb-activations", {"rule": "x"}, "dkvb-activations: rule must be one of 'share', 'paper', got 'x'"),
    ("dkvb-activations", {"min_share": "None"},
     "dkvb-activations: min_share must be a number or null, got 'None' (YAML spells none as null or ~)"),
    ("dkvb-examples", {"num_examples": "x"}, "dkvb-examples: num_examples must be an integer or null, got 'x'"),
    ("dkvb-examples", {"num_examples": 0}, "dkvb-examples: num_examples must be an integer >= 1, got 0"),
    ("potion", {"share": [1]}, "potion: share must be a number or null, got [1]"),
])
def test_unlearner_parameters_are_type_checked_in_one_place(name, params, message):
    from dkvb.unlearn import create_unlearner

    with pytest.raises(ValueError) as info:
        create_unlearner(name, **params)
    assert str(info.value) == message


def test_unlearner_parameters_from_yaml_text_are_numbers():
    from dkvb.unlearn import create_unlearner

    assert create_unlearner("finetune", lr="1e-3", epochs=2).params["lr"] == 1e-3
    assert create_unlearner("dkvb-activations", min_share=1).params["min_share"] == 1
    assert create_unlearner("dkvb-examples", num_examples=None).params["num_examples"] is None


@pytest.mark.parametrize("argv, message", [
    (["--param", "lr=abc"], "finetune: lr must be a number, got 'abc'"),
    (["--param", "epochs=2.5"], "finetune: epochs must be an integer, got 2.5"),
])
def test_cli_unlearn_refuses_a_bad_parameter_before_any_work(argv, message, capsys, monkeypatch, tmp_path):
    import dkvb.experiment
    from dkvb.cli import main

    def forbidden(*a, **k):
        raise AssertionError("work started before the parameters were checked")

    monkeypatch.setattr(dkvb.experiment, "load_embeddings", forbidden)
    config = Path(__file__).resolve().parents[1] / "experiments" / "tiny_synthetic.yaml"
    code = main(["unlearn", str(config), "--set", f"output_dir={tmp_path}", "--method", "finetune",
                 "--class-ids", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_service_refuses_a_bad_parameter_before_any_work(tmp_path):
    from dkvb.service import forget

    with pytest.raises(ValueError, match=r"^dkvb-activations: num_keys must be an integer or null, got 'x'$"):
        forget(tmp_path / "no-store", "a", params={"num_keys": "x"})  # before even looking for the store
