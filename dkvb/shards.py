"""Training a SISA-style sharded ensemble (Bourtoule et al., IEEE S&P 2021).

The training set is split into S disjoint shards and one model (a linear head or a DKVB
classifier) is trained per shard; forgetting (the ``sharded`` unlearner) retrains, from scratch
and without the forget examples, only the shards that held forget examples. (SISA's
slicing/checkpointing inside a shard is not implemented: a shard is retrained from scratch.)

Two assignments, with opposite trade-offs for *class* unlearning:

- ``"random"`` (default): examples are dealt to shards class-stratified at random, so every
  shard sees every class and the ensemble predicts with the mean of the shards' softmax
  outputs (returned as log-probabilities). Each shard sees only 1/S of the data, which costs
  accuracy, and forgetting a whole class touches *every* shard: the unlearning cost is a full
  retrain (of S models on 1/S of the data each).
- ``"class"``: whole classes are dealt to shards (a seeded partition of the classes), so
  forgetting one class retrains exactly the one shard that owns it (~1/S of the retrain
  cost). A shard never sees the other shards' classes, so it cannot tell them apart from its
  own: each class takes its logit from the shard that owns it and the shards' logits are
  compared as they are, uncalibrated (a softmax within each shard would be worse: every shard
  is confident about its own best class, so the shards' top probabilities all tie near 1).
  Expect a larger accuracy cost than ``"random"``, growing with S; ``S = 1`` is one model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import EmbeddingSet
from .flops import FlopCounter
from .models import AGGREGATES, ModelConfig, ShardedEnsemble, ShardScheme, seeded_build
from .train import TrainConfig, check_parameters, fit
from .validate import require, require_choice


def _assign(train: EmbeddingSet, num_shards: int, scheme: ShardScheme, seed: int) -> tuple[Tensor, Tensor]:
    """(assignment (N,), class_owner (S, C)) for a seeded random or class-wise split."""
    g = torch.Generator().manual_seed(seed)
    n_classes = train.num_classes
    assignment = torch.empty(len(train), dtype=torch.long)
    if scheme == "class":
        owner_of = torch.empty(n_classes, dtype=torch.long)
        for s, classes in enumerate(torch.randperm(n_classes, generator=g).tensor_split(num_shards)):
            owner_of[classes] = s
        assignment = owner_of[train.y]
        owner = F.one_hot(owner_of, num_shards).T.bool()
        return assignment, owner
    offset = 0
    for c in range(n_classes):
        idx = (train.y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        assignment[idx] = (offset + torch.arange(len(idx))) % num_shards
        offset += len(idx)
    return assignment, torch.ones(num_shards, n_classes, dtype=torch.bool)


def train_sharded(
    base: nn.Module | dict | ModelConfig,
    train: EmbeddingSet,
    config: TrainConfig,
    num_shards: int = 5,
    *,
    assignment: ShardScheme = "random",
    seed: int = 0,
    flops: FlopCounter | None = None,
) -> ShardedEnsemble:
    """Split ``train`` into ``num_shards`` shards and train one fresh model per shard.

    Args:
        base: the shard architecture: a model (its ``config`` is used), a config dict or a
            :class:`~dkvb.models.ModelConfig`.
        train: the full training set (keep it: unlearning requests must refer to it).
        config: training recipe of every shard (and of every later shard retrain).
        num_shards: S >= 1 (at most the number of classes for ``assignment="class"``).
        assignment: ``"random"`` (class-stratified random) or ``"class"`` (disjoint class sets).
        seed: seeds the assignment and the shard initialisations.
        flops: counter the shards' training FLOPs are added to.
    """
    require_choice("train_sharded", "assignment", assignment, AGGREGATES)
    limit = train.num_classes if assignment == "class" else len(train)
    require(1 <= num_shards <= limit, "train_sharded", "num_shards",
            f"in [1, {limit}] for assignment={assignment!r}", num_shards)
    config_of = base.config if isinstance(base, nn.Module) else base if isinstance(base, dict) else asdict(base)
    base_config = {k: v for k, v in config_of.items() if k not in ("input_dim", "num_classes", "seed")}
    shard_of, owner = _assign(train, num_shards, assignment, seed)
    init = [seeded_build(base_config, train.dim, train.num_classes, seed + s) for s in range(num_shards)]
    ensemble = ShardedEnsemble(init, shard_of, train.y, owner, scheme=assignment,
                               base_config=base_config, train_config=asdict(config), seed=seed)
    for s in range(num_shards):
        train_shard(ensemble, s, train, flops=flops, desc="train_sharded")
    return ensemble.eval()


def train_shard(ensemble: ShardedEnsemble, s: int, train: EmbeddingSet, *, flops: FlopCounter | None = None,
                desc: str = "shard") -> int:
    """(Re)train shard ``s`` of ``ensemble`` from scratch on its assigned examples of ``train``,
    in place; returns how many it got.

    A shard left without examples is reset and deactivated (its classes then never win).
    """
    data = train.subset(ensemble.assignment.cpu() == s)
    shard = seeded_build(ensemble.base_config, ensemble.input_dim, ensemble.num_classes, ensemble.seed + s)
    if len(data):
        recipe = TrainConfig(**ensemble.train_config)
        config = replace(recipe, seed=recipe.seed + s)
        fit(shard, data, config, flops=flops, desc=f"{desc} (shard {s})")
        check_parameters(shard, f"{desc} (shard {s})", config.epochs * math.ceil(len(data) / config.batch_size))
    ensemble.shards[s] = shard.to(ensemble.assignment.device)
    ensemble.active[s] = len(data) > 0
    return len(data)
