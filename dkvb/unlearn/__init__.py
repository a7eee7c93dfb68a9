"""Unlearning methods behind one interface: ``create_unlearner(name, **params).unlearn(model, request)``."""
from .base import UNLEARNERS, ForgetRequest, Unlearner, UnlearnReport, create_unlearner, register
from . import activations, examples  # noqa: F401  (registers the DKVB methods)
from . import finetune, neggrad, rbm, retrain, salun, scrub, sharding, ssd  # noqa: F401  (registers the linear-head baselines)
from . import drop_output, potion  # noqa: F401  (registers the output deletion and Potion)

__all__ = ["UNLEARNERS", "ForgetRequest", "Unlearner", "UnlearnReport", "create_unlearner", "register"]
