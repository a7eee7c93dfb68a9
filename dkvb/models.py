"""Classifiers over frozen embeddings and the one factory that builds them: the DKVB model
(:mod:`dkvb.classifier`), the linear-head baseline and the sharded ensemble.

All share one small surface: ``forward(x) -> logits``, ``input_dim``, ``num_classes`` and
``config`` (a plain dict that rebuilds the module through :func:`build_model`).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .classifier import CODE_EXTRA, CodeCache, DKVBClassifier, KeptLogits, MeanDecoder, MLPDecoder, ModelConfig
from .data import EmbeddingSet, check_embeddings
from .validate import require, require_choice


class LinearHead(nn.Module):
    """One linear layer on the embeddings: the baseline model every gradient method acts on."""

    def __init__(self, input_dim: int, num_classes: int, config: ModelConfig | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.input_dim, self.num_classes, self.seed = input_dim, num_classes, seed
        self.model_config = config or ModelConfig(kind="linear")
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(input_dim, num_classes)
        bound = 1 / input_dim ** 0.5
        with torch.no_grad():
            self.fc.weight.uniform_(-bound, bound, generator=g)
            self.fc.bias.uniform_(-bound, bound, generator=g)

    @property
    def config(self) -> dict:
        return {"kind": "linear", "input_dim": self.input_dim, "num_classes": self.num_classes, "seed": self.seed}

    def prepare(self, x: Tensor, y: Tensor | None = None) -> None:
        """Nothing to initialise from data."""
        check_embeddings(x, self.input_dim)

    def forward(self, x: Tensor) -> Tensor:
        # in training the batches come from an EmbeddingSet, checked once when it was built
        check_embeddings(x, self.input_dim, finite=not self.training)
        return self.fc(x)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())


ShardScheme = Literal["random", "class"]
_NEG = -1e4  # logit of a class whose shard was emptied by unlearning


def _mean_probability(logits: Tensor, owner: Tensor) -> Tensor:
    """(S, N, C) shard logits -> log of the mean softmax over shards."""
    probs = F.softmax(logits, dim=-1).mean(0)
    return probs.clamp_min(1e-12).log()


def _owner_logits(logits: Tensor, owner: Tensor) -> Tensor:
    """(S, N, C) shard logits -> each class's logit from the shard owning it (``owner``: (S, C) bool)."""
    out = (logits * owner.unsqueeze(1)).sum(0)
    return out.masked_fill(~owner.any(0), _NEG)


AGGREGATES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"random": _mean_probability, "class": _owner_logits}


class ShardedEnsemble(nn.Module):
    """S models trained on disjoint shards of one training set (SISA, Bourtoule et al. 2021).

    Train one with :func:`dkvb.shards.train_sharded` (which describes the two schemes); the
    ``sharded`` unlearner retrains shards with :func:`dkvb.shards.train_shard`. With
    ``scheme="random"`` every shard predicts every class and the ensemble returns the log of
    the shards' mean softmax; with ``"class"`` each class takes its (uncalibrated) logit from
    the shard that owns it. ``config`` has ``kind="sharded"``, so :func:`build_model` rebuilds
    an ensemble (:meth:`from_config`) and the model store saves and loads it like any classifier.

    Args:
        shards: the trained shard models (same config, full ``num_classes`` outputs each).
        assignment: (N,) shard of every training example; -1 marks examples already unlearned.
        labels: (N,) labels of that training set, to check that a request refers to it.
        class_owner: (S, num_classes) bool, the classes each shard predicts.
        scheme: ``"random"`` or ``"class"``.
        base_config: config dict of every shard (``build_model`` input).
        train_config: how every shard is (re)trained: :class:`~dkvb.train.TrainConfig` fields as
            a dict (models sit below training, so the recipe is kept as plain data).
        seed: shard ``s`` is built with seed ``seed + s`` and shuffled with ``train_config["seed"] + s``.
    """

    def __init__(
        self,
        shards: list[nn.Module],
        assignment: Tensor,
        labels: Tensor,
        class_owner: Tensor,
        *,
        scheme: ShardScheme,
        base_config: dict,
        train_config: dict,
        seed: int = 0,
    ) -> None:
        super().__init__()
        require_choice("ShardedEnsemble", "scheme", scheme, AGGREGATES)
        require(class_owner.shape == (len(shards), shards[0].num_classes), "ShardedEnsemble", "class_owner",
                "(num_shards, num_classes)", tuple(class_owner.shape))
        self.shards = nn.ModuleList(shards)
        self.input_dim, self.num_classes = shards[0].input_dim, shards[0].num_classes
        self.scheme, self.base_config, self.train_config, self.seed = scheme, dict(base_config), dict(train_config), seed
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
                "base": self.base_config, "train": dict(self.train_config), "input_dim": self.input_dim,
                "num_classes": self.num_classes, "num_train": len(self.labels), "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict) -> "ShardedEnsemble":
        """An untrained ensemble shaped as ``config`` (an ensemble's :attr:`config`), ready for
        ``load_state_dict``: what :func:`build_model` returns for ``kind="sharded"``,
        so the model store can load a saved ensemble."""
        try:
            s, c, n, seed = config["num_shards"], config["num_classes"], config["num_train"], config["seed"]
            shards = [seeded_build(config["base"], config["input_dim"], c, seed + i) for i in range(s)]
            train_config, scheme = config["train"], config["assignment"]
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
        return AGGREGATES[self.scheme](logits, self.class_owner[active])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for shard in self.shards for p in shard.trainable_parameters()]

    def check_train_set(self, train: EmbeddingSet) -> None:
        """ValueError unless ``train`` is the training set the assignment refers to."""
        if len(train) != len(self.labels) or not torch.equal(train.y.to(self.labels.device), self.labels):
            raise ValueError(
                f"the request's training set ({len(train)} examples) is not the one this ensemble was "
                f"trained on ({len(self.labels)} examples): the shard assignment does not apply"
            )


_BUILDERS = {"dkvb": DKVBClassifier, "linear": LinearHead}


# Trades finer keys against the examples that fit each key's value: docs/quality.md#codebook-size
EXAMPLES_PER_KEY = 20


def auto_codebook_size(num_examples: int) -> int:
    """Keys per codebook for a training set of ``num_examples``: the largest power of two with at
    least :data:`EXAMPLES_PER_KEY` examples per key, between 16 and 256 (1,300 images -> 64,
    4,000 -> 128, 60,000 -> 256). Measured on validation splits (docs/quality.md#codebook-size): on sklearn's
    digits (1,300 images) 64 keys beat 32, 128 and 256; on Fashion-MNIST and CIFAR 256 keys is
    the validated setting (larger codebooks were not tried there)."""
    k = 16
    while k < 256 and num_examples >= 2 * k * EXAMPLES_PER_KEY:
        k *= 2
    return k


def auto_num_codebooks(num_examples: int) -> int:
    """Codebooks for a training set of ``num_examples``: 512 from 20,000 examples, else 256.
    Measured with the discriminant projection on validation splits (docs/quality.md#num-codebooks): with
    45,000 CIFAR-10 images 512 beat 256 by 0.9 points (Fashion-MNIST: +0.1); with 3,600 CIFAR-10
    images 256 beat 512 by 2.2 (Fashion-MNIST 4k: -0.5), and on digits (1,300) by 0.7."""
    return 512 if num_examples >= 20_000 else 256


def resolve_config(config: ModelConfig, num_examples: int) -> ModelConfig:
    """``config`` with ``codebook_size``/``num_codebooks`` ``"auto"`` replaced by
    :func:`auto_codebook_size`/:func:`auto_num_codebooks` of the training set's size."""
    if config.codebook_size == "auto":
        config = dataclasses.replace(config, codebook_size=auto_codebook_size(num_examples))
    if config.num_codebooks == "auto":
        config = dataclasses.replace(config, num_codebooks=auto_num_codebooks(num_examples))
    return config


def build_model(config: ModelConfig | dict, input_dim: int, num_classes: int, *, seed: int = 0) -> nn.Module:
    """Build an (untrained) classifier from a config; the one entry point for every model kind."""
    if isinstance(config, dict) and config.get("kind") == "sharded":  # so the store can load an ensemble
        return ShardedEnsemble.from_config({**config, "input_dim": input_dim, "num_classes": num_classes, "seed": seed})
    if isinstance(config, dict):
        known = {f for f in ModelConfig.__dataclass_fields__}
        config = ModelConfig(**{k: v for k, v in config.items() if k in known})
    for name in ("codebook_size", "num_codebooks"):
        if config.kind == "dkvb" and getattr(config, name) == "auto":
            raise ValueError(f"ModelConfig: {name} must be resolved from the training set size first "
                             "(dkvb.models.resolve_config), got 'auto'")
    return _BUILDERS[config.kind](input_dim, num_classes, config, seed=seed)


def seeded_build(config: dict, input_dim: int, num_classes: int, seed: int) -> nn.Module:
    """``build_model`` with the global RNG seeded too, so modules that draw from it (the MLP
    decoder's default init) come out the same every time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(config, input_dim, num_classes, seed=seed)


def fresh_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose trainable parameters are back at their initial values.

    The initial values come from :func:`seeded_build` with the model's own seed, so a linear head
    restarts exactly where the original training started. Frozen state is kept: a DKVB copy
    keeps its keys, projection and key mask (the keys were fitted by k-means on unlabelled
    embeddings of the full training set) and drops its cached activation counts, which were
    counted on data that included the forget classes.
    """
    init = seeded_build(model.config, model.input_dim, model.num_classes, int(model.config.get("seed", 0)))
    out = copy.deepcopy(model)
    init_params = dict(init.named_parameters())
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.requires_grad:
                p.copy_(init_params[name])
    if hasattr(out, "activation_counts"):
        out.activation_counts = torch.zeros(0, dtype=torch.long, device=out.activation_counts.device)
        out.value_ridge.zero_()
    return out


Classifier = DKVBClassifier | LinearHead
__all__ = ["ModelConfig", "DKVBClassifier", "KeptLogits", "CODE_EXTRA", "CodeCache", "LinearHead", "MeanDecoder",
           "MLPDecoder", "ShardedEnsemble",
           "build_model", "seeded_build", "fresh_copy", "Classifier"]
