"""SISA-style sharding (Bourtoule et al., IEEE S&P 2021): exact unlearning by retraining shards.

The training set is split into S disjoint shards and one model (a linear head or a DKVB
classifier) is trained per shard. Forgetting retrains, from scratch and without the forget
examples, only the shards that held forget examples; the other shards are untouched. (SISA's
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

An ensemble saves and loads through the model store like any classifier: its ``config`` has
``kind="sharded"`` and :func:`dkvb.models.build_model` rebuilds it with
:meth:`ShardedEnsemble.from_config`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import EmbeddingSet
from ..flops import FlopCounter
from ..models import ModelConfig
from ..train import TrainConfig, fit
from .base import ForgetRequest, Unlearner, register
from .gradient import check_parameters
from .retrain import seeded_build

Assignment = Literal["random", "class"]
_NEG = -1e4  # logit of a class whose shard was emptied by unlearning


def _mean_probability(logits: Tensor, owner: Tensor) -> Tensor:
    """(S, N, C) shard logits -> log of the mean softmax over shards."""
    probs = F.softmax(logits, dim=-1).mean(0)
    return probs.clamp_min(1e-12).log()


def _owner_logits(logits: Tensor, owner: Tensor) -> Tensor:
    """(S, N, C) shard logits -> each class's logit from the shard owning it (``owner``: (S, C) bool)."""
    out = (logits * owner.unsqueeze(1)).sum(0)
    return out.masked_fill(~owner.any(0), _NEG)


_AGGREGATE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"random": _mean_probability, "class": _owner_logits}


class ShardedEnsemble(nn.Module):
    """S models trained on disjoint shards of one training set; build it with :func:`train_sharded`.

    Args:
        shards: the trained shard models (same config, full ``num_classes`` outputs each).
        assignment: (N,) shard of every training example; -1 marks examples already unlearned.
        labels: (N,) labels of that training set, to check that a request refers to it.
        class_owner: (S, num_classes) bool, the classes each shard predicts.
        scheme: ``"random"`` or ``"class"`` (see the module docstring).
        base_config: config dict of every shard (``build_model`` input).
        train_config: how every shard is (re)trained.
        seed: shard ``s`` is built with seed ``seed + s`` and shuffled with ``train_config.seed + s``.
    """

    def __init__(
        self,
        shards: list[nn.Module],
        assignment: Tensor,
        labels: Tensor,
        class_owner: Tensor,
        *,
        scheme: Assignment,
        base_config: dict,
        train_config: TrainConfig,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if scheme not in _AGGREGATE:
            raise ValueError(f"assignment must be one of {sorted(_AGGREGATE)}, got {scheme!r}")
        if class_owner.shape != (len(shards), shards[0].num_classes):
            raise ValueError(f"class_owner must be (num_shards, num_classes), got {tuple(class_owner.shape)}")
        self.shards = nn.ModuleList(shards)
        self.input_dim, self.num_classes = shards[0].input_dim, shards[0].num_classes
        self.scheme, self.base_config, self.train_config, self.seed = scheme, dict(base_config), train_config, seed
        self.register_buffer("assignment", assignment.long().clone())
        self.register_buffer("labels", labels.long().clone())
        self.register_buffer("class_owner", class_owner.bool().clone())
        self.register_buffer("active", torch.ones(len(shards), dtype=torch.bool))

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def config(self) -> dict:
        return {"kind": "sharded", "assignment": self.scheme, "num_shards": self.num_shards,
                "base": self.base_config, "train": asdict(self.train_config), "input_dim": self.input_dim,
                "num_classes": self.num_classes, "num_train": len(self.labels), "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict) -> "ShardedEnsemble":
        """An untrained ensemble shaped as ``config`` (an ensemble's :attr:`config`), ready for
        ``load_state_dict``: what :func:`dkvb.models.build_model` returns for ``kind="sharded"``,
        so the model store can load a saved ensemble."""
        try:
            s, c, n, seed = config["num_shards"], config["num_classes"], config["num_train"], config["seed"]
            shards = [seeded_build(config["base"], config["input_dim"], c, seed + i) for i in range(s)]
            train_config = TrainConfig(**config["train"])
            scheme = config["assignment"]
        except KeyError as e:
            raise ValueError(f"sharded config lacks field {e}") from None
        empty = torch.zeros(n, dtype=torch.long)
        return cls(shards, empty, empty, torch.ones(s, c, dtype=torch.bool), scheme=scheme,
                   base_config=config["base"], train_config=train_config, seed=seed)

    def forward(self, x: Tensor) -> Tensor:
        active = self.active.nonzero().flatten().tolist()
        if not active:
            raise RuntimeError("every shard was emptied by unlearning: nothing left to predict with")
        logits = torch.stack([self.shards[s](x) for s in active])
        return _AGGREGATE[self.scheme](logits, self.class_owner[active])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for shard in self.shards for p in shard.trainable_parameters()]

    def check_train_set(self, train: EmbeddingSet) -> None:
        """ValueError unless ``train`` is the training set the assignment refers to."""
        if len(train) != len(self.labels) or not torch.equal(train.y.to(self.labels.device), self.labels):
            raise ValueError(
                f"the request's training set ({len(train)} examples) is not the one this ensemble was "
                f"trained on ({len(self.labels)} examples): the shard assignment does not apply"
            )

    def train_shard(self, s: int, train: EmbeddingSet, *, flops: FlopCounter | None = None,
                    desc: str = "shard") -> int:
        """(Re)train shard ``s`` from scratch on its assigned examples; returns how many it got.

        A shard left without examples is reset and deactivated (its classes then never win).
        """
        data = train.subset(self.assignment.cpu() == s)
        shard = seeded_build(self.base_config, self.input_dim, self.num_classes, self.seed + s)
        if len(data):
            config = TrainConfig(**{**asdict(self.train_config), "seed": self.train_config.seed + s})
            fit(shard, data, config, flops=flops, desc=f"{desc} (shard {s})")
            check_parameters(shard, f"{desc} (shard {s})", config.epochs * math.ceil(len(data) / config.batch_size))
        self.shards[s] = shard.to(self.assignment.device)
        self.active[s] = len(data) > 0
        return len(data)


def _assign(train: EmbeddingSet, num_shards: int, scheme: Assignment, seed: int) -> tuple[Tensor, Tensor]:
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
    assignment: Assignment = "random",
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
    if assignment not in _AGGREGATE:
        raise ValueError(f"assignment must be one of {sorted(_AGGREGATE)}, got {assignment!r}")
    limit = train.num_classes if assignment == "class" else len(train)
    if not 1 <= num_shards <= limit:
        raise ValueError(f"num_shards must be in [1, {limit}] for assignment={assignment!r}, got {num_shards}")
    config_of = base.config if isinstance(base, nn.Module) else base if isinstance(base, dict) else asdict(base)
    base_config = {k: v for k, v in config_of.items() if k not in ("input_dim", "num_classes", "seed")}
    shard_of, owner = _assign(train, num_shards, assignment, seed)
    init = [seeded_build(base_config, train.dim, train.num_classes, seed + s) for s in range(num_shards)]
    ensemble = ShardedEnsemble(init, shard_of, train.y, owner, scheme=assignment,
                               base_config=base_config, train_config=config, seed=seed)
    for s in range(num_shards):
        ensemble.train_shard(s, train, flops=flops, desc="train_sharded")
    return ensemble.eval()


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
        sizes = [out.train_shard(s, request.train, flops=flops, desc=self.name) for s in retrain]
        return out, flops.total, {"retrained_shards": retrain, "num_shards": model.num_shards,
                                  "examples_retrained_on": sum(sizes),
                                  "retrain_fraction": sum(sizes) / len(request.retain),
                                  "emptied_shards": [s for s, n in zip(retrain, sizes) if n == 0]}
