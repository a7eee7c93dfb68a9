"""The checkpoint format of a DKVB's optional state (:mod:`dkvb.value_start`): the start and the
class corrections are saved under the bottleneck's own names, and a checkpoint in that format
loads and serves the numbers the code that wrote it computed.

``data/checkpoint_8793ce4.safetensors`` holds a probe-started model's state dict (``model.*``) and
what :func:`outputs` computed from it (the logits, and after two forget requests the logits, value
tables and saved bottleneck tensors), all written by :func:`write_fixture` with the code at commit 8793ce4.
"""
from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_clusters
from safetensors.torch import load_file, save_file
from torch import Tensor

from dkvb import DKVBClassifier, ModelConfig, TrainConfig, build_model, fit
from dkvb.unlearn import ForgetRequest, create_unlearner

FIXTURE = Path(__file__).parent / "data" / "checkpoint_8793ce4.safetensors"
CONFIG = ModelConfig(num_codebooks=8, codebook_size=16, key_dim=2, projection="random")
DIM, CLASSES = 8, 4
BOTTLENECK = ["values", "projection", "whitening", "keys", "key_mask", "initted", "value_start", "value_start_bias",
              "value_floor", "delta_classes", "value_delta"]


def clusters(n: int, seed: int):
    return make_clusters(n, dim=DIM, num_classes=CLASSES, spread=1.5, seed=seed)


def outputs(model: DKVBClassifier) -> dict[str, Tensor]:
    """The logits on a test set, and after two forget requests (a masking one, then one releasing
    keys with a score floor) their logits, value tables and saved values, mask, start and corrections."""
    train, test = clusters(600, 0), clusters(100, 1)
    out = {"logits": model(test.x)}
    first = create_unlearner("dkvb-activations").unlearn(model, ForgetRequest((1,), train)).model
    second = create_unlearner("dkvb-activations", refit_epochs=1, release_keys=True, floor_scores=0.5).unlearn(
        first, ForgetRequest((2,), train, forgotten=(1,))).model
    for name, m in (("first", first), ("second", second)):
        out[f"{name}.logits"], out[f"{name}.table"] = m(test.x), m.bottleneck.value_table()
        state = m.state_dict()
        out.update({f"{name}.{k}": state[f"bottleneck.{k}"] for k in ("values", "key_mask", *BOTTLENECK[-5:])})
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def write_fixture(path: Path = FIXTURE) -> None:
    """Train the fixture's model with fixed seeds and write its state dict and :func:`outputs`."""
    train = clusters(600, 0)
    torch.manual_seed(0)
    model = fit(build_model(CONFIG, DIM, CLASSES, seed=0), train,
                TrainConfig(epochs=2, lr=1e-2, value_init="probe", probe_c=0.1))
    model.compute_activation_counts(train.x, train.y)
    state = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file({**state, **outputs(model)}, str(path))


def test_the_start_and_corrections_are_saved_under_the_bottleneck_names():
    model = build_model(CONFIG, DIM, CLASSES, seed=0)
    b = model.bottleneck
    weight, bias = torch.randn(8, 2, CLASSES), torch.randn(CLASSES)
    b.keys.normal_()
    b.start.set(weight, bias, b.keys)
    b.corrections.add(torch.tensor([2]), torch.randn(8, 16, 1))
    state = model.state_dict()
    assert list(state) == ["activation_counts", "value_ridge", "value_ridge_shards",
                           *(f"bottleneck.{n}" for n in BOTTLENECK)]
    assert set(state._metadata) == {"", "bottleneck", "decoder"}
    saved = dict(zip(BOTTLENECK[-5:], (b.start.weight, b.start.bias, b.start.floor, b.corrections.classes,
                                       b.corrections.delta)))
    kept = model.state_dict(keep_vars=True)
    assert all(kept[f"bottleneck.{n}"] is t for n, t in saved.items())
    fresh = build_model(CONFIG, DIM, CLASSES, seed=1)
    fresh.load_state_dict(state)
    assert all(torch.equal(getattr(fresh.bottleneck.start, n), getattr(b.start, n)) for n in ("weight", "bias", "floor"))
    assert torch.equal(fresh.bottleneck.corrections.delta, b.corrections.delta)
    assert fresh.bottleneck.corrections.classes.tolist() == [2]


def test_a_checkpoint_written_with_the_flat_layout_loads_and_serves_its_numbers():
    stored = load_file(str(FIXTURE))
    state = {k.removeprefix("model."): v for k, v in stored.items() if k.startswith("model.")}
    model = build_model(CONFIG, DIM, CLASSES, seed=0)
    model.activation_counts = torch.zeros_like(state["activation_counts"])  # as the store does
    model.load_state_dict(state)
    assert model.bottleneck.start.is_set and not model.bottleneck.corrections.classes.numel()
    loaded = model.state_dict()
    assert set(loaded) == set(state) | {"value_ridge", "value_ridge_shards"}
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert float(loaded["value_ridge"]) == 0.0  # a checkpoint saved before ridge values holds no ridge fit
    assert int(loaded["value_ridge_shards"]) == 1
    fresh = outputs(model)
    expected = {k: v for k, v in stored.items() if not k.startswith("model.")}
    assert fresh.keys() == expected.keys()
    assert fresh["first.delta_classes"].tolist() == [1] and fresh["second.delta_classes"].tolist() == [2]
    for name, value in expected.items():  # float32 rounding apart: other machines may run other BLAS kernels
        torch.testing.assert_close(fresh[name], value, rtol=0, atol=1e-5, msg=name)
