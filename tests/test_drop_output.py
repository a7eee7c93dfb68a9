"""The output-deletion baseline (dkvb.unlearn.drop_output) on both model families."""
from __future__ import annotations

import pytest
import torch

from dkvb.evaluate import accuracy, predict_logits
from dkvb.unlearn import ForgetRequest, create_unlearner
from dkvb.unlearn.drop_output import DELETED_LOGIT


@pytest.mark.parametrize("model_name", ["trained_linear", "trained_dkvb"])
def test_the_class_is_never_predicted_and_every_other_logit_is_kept(clusters, model_name, request):
    train, test = clusters
    model = request.getfixturevalue(model_name)
    before = predict_logits(model, test.x)
    report = create_unlearner("drop-output").unlearn(model, ForgetRequest((2,), train))
    after = predict_logits(report.model, test.x)
    assert torch.allclose(after[:, 2], torch.full((len(test),), DELETED_LOGIT))
    keep = [c for c in range(train.num_classes) if c != 2]
    assert torch.allclose(after[:, keep], before[:, keep], atol=1e-5)
    assert accuracy(after[test.y == 2], test.y[test.y == 2]) == 0.0
    assert torch.equal(predict_logits(model, test.x), before)  # the input model is untouched
    assert 0 < report.flops < 10 ** 6


def test_a_dkvb_with_a_start_and_an_earlier_request_shares_its_frozen_tensors_and_stays_intact(clusters):
    """Drop-output copies only what it writes (values, start, corrections): the keys, counts and
    cached codes are the original's own tensors, and the original's outputs do not move."""
    from dkvb.models import build_model
    from dkvb.train import TrainConfig, fit
    from conftest import SMALL_DKVB

    train, test = clusters
    model = fit(build_model(SMALL_DKVB, train.dim, train.num_classes, seed=0), train,
                TrainConfig(epochs=2, lr=1e-2, value_init="probe", probe_c=0.1))
    model.compute_activation_counts(train.x, train.y)
    model = create_unlearner("dkvb-activations").unlearn(model, ForgetRequest((1,), train)).model
    assert model.bottleneck.start.is_set and model.bottleneck.corrections.classes.numel()
    before = predict_logits(model, test.x)
    values, start = model.bottleneck.values.detach().clone(), model.bottleneck.start.weight.clone()
    out = create_unlearner("drop-output").unlearn(model, ForgetRequest((2,), train)).model
    assert out.bottleneck.keys is model.bottleneck.keys
    assert out.activation_counts is model.activation_counts
    assert torch.equal(predict_logits(model, test.x), before)
    assert torch.equal(model.bottleneck.values, values) and torch.equal(model.bottleneck.start.weight, start)
    assert torch.allclose(predict_logits(out, test.x)[:, 2], torch.full((len(test),), DELETED_LOGIT))
