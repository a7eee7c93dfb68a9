"""dkvb: low-compute class unlearning with discrete key-value bottlenecks."""
from .threads import reproducible_products

reproducible_products()  # before torch's first matrix product: the same seed, the same bits at any thread count

from .bottleneck import DiscreteKeyValueBottleneck
from .data import EmbeddingSet, resolve_classes
from .evaluate import evaluate
from .models import DKVBClassifier, LinearHead, ModelConfig, build_model
from .train import TrainConfig, fit
from .unlearn import ForgetRequest, UnlearnReport, create_unlearner

__version__ = "0.1.0"
__all__ = [
    "DiscreteKeyValueBottleneck", "EmbeddingSet", "resolve_classes", "evaluate", "DKVBClassifier", "LinearHead",
    "ModelConfig", "build_model", "TrainConfig", "fit", "ForgetRequest", "UnlearnReport", "create_unlearner",
]
