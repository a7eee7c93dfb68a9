"""Verification: accuracy, membership inference and the relearning probe, next to retraining."""
import json
import math

import pytest
import torch

from dkvb import ForgetRequest, ModelConfig, TrainConfig, build_model, create_unlearner, fit
from dkvb.cli import main
from dkvb.service import forget
from dkvb.store import save_model
from dkvb.verify import VERIFY_COLUMNS, ProbeConfig, format_columns, relearn_steps, unmasked_accuracy, verify

RETRAIN = {"epochs": 3, "lr": 1e-2}


@pytest.fixture(scope="module")
def original(clusters):
    train, _ = clusters
    model = build_model(ModelConfig(num_codebooks=8, codebook_size=32, key_dim=4, projection="random"), train.dim, train.num_classes)
    fit(model, train, TrainConfig(epochs=3, lr=1e-2))
    model.compute_activation_counts(train.x, train.y)
    return model


@pytest.fixture(scope="module")
def unlearned(original, clusters):
    train, _ = clusters
    return create_unlearner("dkvb-activations").unlearn(original, ForgetRequest((1,), train)).model


@pytest.fixture(scope="module")
def row(unlearned, original, clusters):
    train, test = clusters
    return verify(unlearned, original, train, test, [1], retrain_params=RETRAIN, probe=ProbeConfig(max_steps=60))


def test_verify_reports_every_column_against_retraining(row):
    assert list(row) == list(VERIFY_COLUMNS)
    assert row["forget_train_acc"] <= 0.01 and row["forget_test_acc"] <= 0.01 and row["retain_test_acc"] >= 0.95
    assert 0 <= row["mia"] <= 1 and 0 <= row["mia_retrain"] <= 1
    assert abs(row["mia"] - row["mia_retrain"]) <= 0.2  # masking scores like retraining on this easy problem
    assert row["relearn_target_acc"] == pytest.approx(0.5, abs=0.01)  # half of the original's ~100%
    assert 1 <= row["relearn_steps"] <= 60 and 1 <= row["relearn_steps_retrain"] <= 60
    # honest: the masked keys still hold the forget class; clearing the mask gives it back
    assert row["forget_test_acc_unmasked"] >= 0.95
    assert "relearn_steps" in format_columns(row)


def test_masked_keys_stay_masked_during_the_probe(unlearned, clusters):
    train, test = clusters
    forget_train, _ = train.split([1])
    forget_test, _ = test.split([1])
    before = {k: v.clone() for k, v in unlearned.state_dict().items()}
    steps = relearn_steps(unlearned, forget_train.subset(slice(0, 10)), forget_test, 0.5, lr=1.0, max_steps=60)
    assert 1 <= steps <= 60
    after = unlearned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the probe tunes a copy


def test_probe_edge_cases(original, unlearned, clusters):
    train, test = clusters
    forget_train, _ = train.split([1])
    forget_test, _ = test.split([1])
    few = forget_train.subset(slice(0, 5))
    assert relearn_steps(original, few, forget_test, 0.5, lr=1.0, max_steps=5) == 0  # never forgot
    assert relearn_steps(unlearned, few, forget_test, 0.99, lr=1e-9, max_steps=3) == math.inf
    assert math.isnan(relearn_steps(unlearned, few.subset(slice(0, 0)), forget_test, 0.5, lr=1.0, max_steps=3))
    with pytest.raises(ValueError, match=r"^ProbeConfig: lr must be > 0, got 0$"):
        ProbeConfig(lr=0)
    with pytest.raises(ValueError, match=r"^ProbeConfig: target must be in \(0, 1\], got 1.5$"):
        ProbeConfig(target=1.5)


def test_linear_models_have_no_unmasked_column(clusters):
    train, test = clusters
    linear = fit(build_model({"kind": "linear"}, train.dim, train.num_classes), train, TrainConfig(epochs=3, lr=1e-2))
    retrained = create_unlearner("retrain", **RETRAIN).unlearn(linear, ForgetRequest((2,), train)).model
    out = verify(retrained, linear, train, test, [2], retrained=retrained, probe=ProbeConfig(max_steps=20))
    assert math.isnan(out["forget_test_acc_unmasked"]) and math.isnan(unmasked_accuracy(linear, test))
    assert out["mia"] == out["mia_retrain"] and out["relearn_steps"] == out["relearn_steps_retrain"]


def test_cli_verify_on_a_stored_model(original, clusters, tmp_path, capsys):
    train, test = clusters
    store = tmp_path / "model"
    save_model(original, store, class_names=list(train.class_names), encoder="synthetic")
    torch.save({"x": train.x, "y": train.y, "encoder": "synthetic"}, tmp_path / "train.pt")
    torch.save({"x": test.x, "y": test.y, "encoder": "synthetic"}, tmp_path / "test.pt")
    data = ["--embeddings", str(tmp_path / "train.pt"), "--test-embeddings", str(tmp_path / "test.pt")]
    assert main(["verify", "--model", str(store), *data]) == 2
    assert "no requests logged" in capsys.readouterr().err
    first = forget(store, "class1")
    forget(store, "class3")
    args = ["verify", "--model", str(store), *data, "--retrain-epochs", "3", "--retrain-lr", "0.01",
            "--max-steps", "40", "--json"]
    assert main([*args, "--request", first["request_id"]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["forgotten"] == ["class1"] and out["version"] == first["version_after"] and out["origin"] == "000001"
    assert set(VERIFY_COLUMNS) <= set(out) and out["forget_test_acc"] <= 0.01
    assert main(args[:-1]) == 0  # the latest request, as a table
    text = capsys.readouterr().out
    assert "forgotten: class1, class3" in text and "masked keys stay masked" in text


def test_probe_examples_are_the_seeded_draw_among_the_forget_rows(clusters):
    from dkvb.verify import probe_sets

    train, test = clusters
    probe = ProbeConfig(examples=7, seed=3)
    few, forget_test = probe_sets(train, test, [2, 0], probe)
    forget_train, _ = train.split([0, 2])  # the draw as it was made from the split forget set
    g = torch.Generator().manual_seed(3)
    expected = forget_train.subset(torch.randperm(len(forget_train), generator=g)[:7])
    assert torch.equal(few.x, expected.x) and torch.equal(few.y, expected.y)
    assert torch.equal(forget_test.x, test.split([0, 2])[0].x)


def test_probe_from_kept_candidates_equals_the_probe_that_searches(original, clusters):
    from dkvb.verify import probe_relearning

    train, test = clusters
    cands = original.bottleneck.candidates(test.x, extra=2)
    for params in ({}, {"min_share": 0.0}, {"num_keys": 1}):
        model = create_unlearner("dkvb-activations", **params).unlearn(original, ForgetRequest((1,), train)).model
        probe = ProbeConfig(max_steps=30)
        searched = probe_relearning(model, train, test, [1], 0.5, probe)
        assert probe_relearning(model, train, test, [1], 0.5, probe, cands) == searched
