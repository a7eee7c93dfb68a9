"""SISA-style exact unlearning: retrain only the shards of a :class:`~dkvb.models.ShardedEnsemble`
that held forget examples (the ensemble and its training live in :mod:`dkvb.models` and
:mod:`dkvb.shards`, which describes the two shard assignments)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ..flops import FlopCounter
from ..models import ShardedEnsemble
from ..shards import train_shard
from .base import ForgetRequest, Unlearner, register


@register("sharded")
@dataclass
class ShardedRetrain(Unlearner):
    """Exact unlearning for a :class:`ShardedEnsemble`: retrain only the shards that held forget examples.

    Each affected shard is rebuilt from its initial seed and trained with the ensemble's own
    ``train_config`` on its remaining examples; the other shards are not touched (bitwise).
    With ``assignment="random"`` a class forget request touches every shard; with ``"class"``
    only the owners of the forget classes. No hyperparameters: the recipe is the ensemble's.

    FLOPs: forward + backward of every training step of the retrained shards.

    Details: ``retrained_shards`` (sorted shard indices), ``num_shards``,
    ``examples_retrained_on`` and ``retrain_fraction`` (that count over the retain-set size,
    i.e. the unlearning cost relative to retraining one model on the whole retain set),
    ``emptied_shards`` (retrained shards left with no example, now inactive). The accuracy cost
    of sharding is the gap between the ensemble's and a single model's accuracy before any
    unlearning (the experiment's ``original`` rows for the ``sharded`` and ``linear`` models).
    """

    model_kind = "sharded"

    def _unlearn(self, model: ShardedEnsemble, request: ForgetRequest) -> tuple[ShardedEnsemble, int, dict[str, Any]]:
        model.check_train_set(request.train)
        forget = request.train.class_mask(request.forget_classes).to(model.assignment.device)
        held = model.assignment[forget]
        retrain = sorted(set(held[held >= 0].tolist()))
        out, flops = copy.deepcopy(model), FlopCounter()
        out.assignment[forget] = -1
        sizes = [train_shard(out, s, request.train, flops=flops, desc=self.name) for s in retrain]
        return out, flops.total, {"retrained_shards": retrain, "num_shards": model.num_shards,
                                  "examples_retrained_on": sum(sizes),
                                  "retrain_fraction": sum(sizes) / len(request.retain),
                                  "emptied_shards": [s for s, n in zip(retrain, sizes) if n == 0]}
