"""Classifiers over frozen embeddings: the DKVB model and the linear-head baseline.

Both share one small surface: ``forward(x) -> logits``, ``input_dim``, ``num_classes`` and
``config`` (a plain dict that rebuilds the module through :func:`build_model`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .bottleneck import Candidates, DiscreteKeyValueBottleneck
from .data import check_embeddings


@dataclass
class ModelConfig:
    """What to build on top of the embeddings.

    Attributes:
        kind: ``"dkvb"`` (bottleneck + decoder) or ``"linear"`` (one linear layer, the paper's baseline).
        num_codebooks: C.
        codebook_size: K keys per codebook.
        key_dim: dimension of each key.
        topk: keys selected per codebook.
        decoder: ``"mean"`` (non-parametric average of values; value_dim = number of classes)
            or ``"mlp"`` (values of size ``value_dim`` averaged over codebooks, then a small MLP).
        value_dim: value size for the MLP decoder (ignored by ``mean``).
        hidden_dim: hidden width of the MLP decoder.
        projection: ``"random"``, ``"pca"`` or ``"whitened"`` (see :class:`DiscreteKeyValueBottleneck`).
        whiten_dim: dimensions kept by the ``"whitened"`` projection.
        search: nearest-key search backend, ``"torch"`` or ``"faiss"``.
        kmeans_iters: faiss k-means iterations for key initialisation.
    """

    kind: Literal["dkvb", "linear"] = "dkvb"
    num_codebooks: int = 64
    codebook_size: int = 256
    key_dim: int = 8
    topk: int = 1
    decoder: Literal["mean", "mlp"] = "mean"
    value_dim: int = 64
    hidden_dim: int = 256
    projection: Literal["random", "pca", "whitened"] = "random"
    whiten_dim: int = 128
    search: Literal["torch", "faiss"] = "torch"
    kmeans_iters: int = 20

    def __post_init__(self) -> None:
        if self.kind not in _BUILDERS:
            raise ValueError(f"unknown model kind {self.kind!r}; choose from {sorted(_BUILDERS)}")
        if self.decoder not in _DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; choose from {sorted(_DECODERS)}")


class MeanDecoder(nn.Module):
    """Non-parametric decoder: the logits are the pooled values (the mean over codebooks and top-k)."""

    def forward(self, pooled: Tensor) -> Tensor:
        return pooled


class MLPDecoder(nn.Module):
    """Linear-ReLU-Linear from the pooled values (mean over codebooks and top-k) to class logits."""

    def __init__(self, value_dim: int, num_classes: int, *, hidden_dim: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(value_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_classes))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(pooled)


class DKVBClassifier(nn.Module):
    """Frozen embedding -> discrete key-value bottleneck -> decoder -> logits.

    ``activation_counts`` (num_classes, C, K), once computed with :meth:`compute_activation_counts`,
    lets unlearning via activations run without any forward pass.
    """

    def __init__(self, input_dim: int, num_classes: int, config: ModelConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.input_dim, self.num_classes, self.seed = input_dim, num_classes, seed
        self.model_config = config
        value_dim = num_classes if config.decoder == "mean" else config.value_dim
        self.bottleneck = DiscreteKeyValueBottleneck(
            input_dim, config.num_codebooks, config.codebook_size, key_dim=config.key_dim,
            value_dim=value_dim, topk=config.topk, projection=config.projection,
            whiten_dim=config.whiten_dim, search=config.search, seed=seed,
        )
        self.decoder = (MeanDecoder() if config.decoder == "mean"
                        else MLPDecoder(value_dim, num_classes, hidden_dim=config.hidden_dim))
        self.register_buffer("activation_counts", torch.zeros(0, dtype=torch.long))

    @property
    def config(self) -> dict:
        return {**asdict(self.model_config), "input_dim": self.input_dim, "num_classes": self.num_classes,
                "seed": self.seed}

    @property
    def key_mask(self) -> Tensor:
        return self.bottleneck.key_mask

    def prepare(self, x: Tensor) -> None:
        """Initialise keys by k-means on (unlabelled) training embeddings."""
        self.bottleneck.init_keys(x, niter=self.model_config.kmeans_iters)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.bottleneck.lookup(x))

    def decode(self, indices: Tensor) -> Tensor:
        """Logits from selected key indices (N, C, topk): lets a caller reuse one lookup."""
        return self.decoder(self.bottleneck.pool(self.bottleneck.flat_indices(indices)))

    @torch.no_grad()
    def predict_from(self, x: Tensor, cands: Candidates) -> Tensor:
        """Logits of ``x`` from candidates kept by ``bottleneck.candidates(x)`` (on this model or
        one sharing its keys): no fresh search unless the mask leaves a row without candidates."""
        self.eval()
        return self.decode(self.bottleneck.select(x, cands))

    @torch.no_grad()
    def compute_activation_counts(self, x: Tensor, y: Tensor, *, indices: Tensor | None = None) -> Tensor:
        """Count and cache per-class key activations of the (training) embeddings ``x``.

        Counts are taken with no keys masked, so they describe the trained model and stay
        valid across later masking requests; ``indices`` reuses an unmasked lookup of ``x``.
        """
        mask = self.bottleneck.key_mask.clone()
        self.bottleneck.key_mask.zero_()
        try:
            counts = self.bottleneck.activation_counts(x, y, self.num_classes, indices=indices)
        finally:
            self.bottleneck.key_mask.copy_(mask)
        self.activation_counts = counts
        return counts

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


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

    def prepare(self, x: Tensor) -> None:
        """Nothing to initialise from data."""
        check_embeddings(x, self.input_dim)

    def forward(self, x: Tensor) -> Tensor:
        check_embeddings(x, self.input_dim)
        return self.fc(x)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())


_BUILDERS = {"dkvb": DKVBClassifier, "linear": LinearHead}
_DECODERS = {"mean": MeanDecoder, "mlp": MLPDecoder}


def build_model(config: ModelConfig | dict, input_dim: int, num_classes: int, *, seed: int = 0) -> nn.Module:
    """Build an (untrained) classifier from a config; the one entry point for every model kind."""
    if isinstance(config, dict) and config.get("kind") == "sharded":  # so the store can load an ensemble
        from .unlearn.sharding import ShardedEnsemble

        return ShardedEnsemble.from_config({**config, "input_dim": input_dim, "num_classes": num_classes, "seed": seed})
    if isinstance(config, dict):
        known = {f for f in ModelConfig.__dataclass_fields__}
        config = ModelConfig(**{k: v for k, v in config.items() if k in known})
    return _BUILDERS[config.kind](input_dim, num_classes, config, seed=seed)


Classifier = DKVBClassifier | LinearHead
__all__ = ["ModelConfig", "DKVBClassifier", "LinearHead", "MeanDecoder", "MLPDecoder", "build_model", "Classifier"]
