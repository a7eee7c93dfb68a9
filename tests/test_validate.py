"""One validation message format everywhere: ``<where>: <parameter> must be <rule>, got <value>``."""
from __future__ import annotations

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
    with pytest.raises(ValueError, match=r"^config: train\.epochs must be an integer, got 'many' \(YAML reads"):
        load_config(path, ["train.epochs=many"])
    with pytest.raises(ValueError, match=r"^TrainConfig: batch_size must be >= 1, got 0$"):
        load_config(path, ["train.batch_size=0"])
