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
