"""The DKVB classifier: frozen embedding -> discrete key-value bottleneck -> decoder -> logits,
its configuration, its decoders, and what it keeps between requests (training codes, logits).
:mod:`dkvb.models` builds it (and the other model kinds) from a config.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .bottleneck import DiscreteKeyValueBottleneck
from .data import fingerprint
from .selection import Candidates
from .validate import require_choice


@dataclass
class ModelConfig:
    """What to build on top of the embeddings.

    Attributes:
        kind: ``"dkvb"`` (bottleneck + decoder) or ``"linear"`` (one linear layer, the paper's baseline).
        num_codebooks: C, or ``"auto"``: :func:`auto_num_codebooks` of the training set's size.
        codebook_size: K keys per codebook, or ``"auto"``: :func:`auto_codebook_size` of the
            training set's size (resolved by :func:`resolve_config` before a model is built).
        key_dim: dimension of each key.
        topk: keys selected per codebook.
        decoder: ``"mean"`` (non-parametric average of values; value_dim = number of classes)
            or ``"mlp"`` (values of size ``value_dim`` averaged over codebooks, then a small MLP).
        value_dim: value size for the MLP decoder (ignored by ``mean``).
        hidden_dim: hidden width of the MLP decoder.
        projection: ``"random"``, ``"pca"``, ``"whitened"`` or ``"discriminant"`` (see
            :class:`DiscreteKeyValueBottleneck`; ``discriminant`` is fitted with the labels).
        whiten_dim: dimensions kept by the ``"whitened"``/``"discriminant"`` projections.
        discriminant_weight, discriminant_shrinkage: of the ``"discriminant"`` projection.
        search: nearest-key search backend, ``"torch"`` or ``"faiss"``.
        kmeans_iters: faiss k-means iterations for key initialisation.
    """

    kind: Literal["dkvb", "linear"] = "dkvb"
    num_codebooks: int | Literal["auto"] = 256
    codebook_size: int | Literal["auto"] = 256
    key_dim: int = 8  # finer keys vs their quantisation error: docs/quality.md#key-dim
    topk: int = 1  # rows per key vs training time and memory: docs/quality.md#topk
    decoder: Literal["mean", "mlp"] = "mean"  # docs/quality.md#decoder
    value_dim: int = 64
    hidden_dim: int = 256
    # keys that follow the classes vs label-free keys: docs/quality.md#projection
    projection: Literal["random", "pca", "whitened", "discriminant"] = "discriminant"
    whiten_dim: int = 128  # directions kept vs examples per direction: docs/quality.md#whiten-dim
    discriminant_weight: float = 4.0  # class directions vs the rest of the input: docs/quality.md#discriminant-weight
    discriminant_shrinkage: float | Literal["auto"] = "auto"
    search: Literal["torch", "faiss"] = "torch"
    kmeans_iters: int = 20

    def __post_init__(self) -> None:
        require_choice("ModelConfig", "kind", self.kind, ("dkvb", "linear"))
        require_choice("ModelConfig", "decoder", self.decoder, ("mean", "mlp"))


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


CODE_EXTRA = 3  # keys a CodeCache keeps per (row, codebook) beyond topk


class CodeCache(NamedTuple):
    """What a model keeps of its training embeddings between requests, in memory (never saved),
    so that re-fitting after a mask searches only the (row, codebook) pairs the mask leaves
    without a kept key, projecting each into that codebook alone.

    ``digest``: the embeddings' :func:`~dkvb.data.fingerprint`; ``candidates``: their
    :class:`~dkvb.selection.Candidates`, ``topk + CODE_EXTRA`` keys per pair (the first ``topk``
    are the keys selected under ``candidates.mask``; a key masked later falls back on the next
    one, with no search: on Fashion-MNIST a one-class mask leaves 7x fewer pairs to search than
    with ``topk`` alone; int16, 60,000 rows x 256 codebooks x 4 keys: 123 MB); ``whitened``: their
    ``bottleneck.whiten_rows`` (60,000 x 128 float32: 30 MB), ``None`` without whitening (the
    embeddings themselves are read then); ``current`` (bool per row): the rows whose candidates
    hold under ``candidates.mask`` (a re-fit brings only the retained classes' rows up to date).
    """

    digest: str
    candidates: Candidates
    whitened: Tensor | None
    current: Tensor


class KeptLogits(NamedTuple):
    """A DKVB's logits on some embeddings, kept with what they were computed from (see
    :meth:`DKVBClassifier.keep_logits`), so that a copy with more keys masked or some values
    changed computes again only the rows the change reaches.

    ``candidates``: the embeddings' nearest keys, searched under the mask the logits were computed
    with; ``logits``: (N, num_classes); ``values`` and ``decoder``: copies of the values as served
    (``value_table``) and of the decoder's state they were computed with.
    """

    candidates: Candidates
    logits: Tensor
    values: Tensor
    decoder: dict[str, Tensor]


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
            discriminant_weight=config.discriminant_weight, discriminant_shrinkage=config.discriminant_shrinkage,
        )
        self.decoder = (MeanDecoder() if config.decoder == "mean"
                        else MLPDecoder(value_dim, num_classes, hidden_dim=config.hidden_dim))
        self.register_buffer("activation_counts", torch.zeros(0, dtype=torch.long))
        # the ridge penalty when the values are a ridge fit (value_init=ridge, no epochs), else 0
        self.register_buffer("value_ridge", torch.zeros((), dtype=torch.float64))
        self.register_buffer("value_ridge_shards", torch.ones((), dtype=torch.long))  # its shards
        self.code_cache: CodeCache | None = None
        self.ridge_system = None  # a ridge-valued model's dual system (dkvb.value_init.RidgeSystem), kept in memory
        self._totals: tuple[Tensor, Tensor] | None = None  # (count table, its sum over classes): activation_totals

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        """A checkpoint saved without ``value_ridge`` holds values that are no ridge fit (and one
        without ``value_ridge_shards`` a fit of one shard)."""
        state_dict.setdefault(prefix + "value_ridge", torch.zeros((), dtype=torch.float64))
        state_dict.setdefault(prefix + "value_ridge_shards", torch.ones((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def check_ridge(self) -> None:
        """ValueError naming the saved buffer when ``value_ridge``/``value_ridge_shards`` describe
        no ridge fit (a checkpoint edited or written by other code)."""
        penalty, shards = float(self.value_ridge), int(self.value_ridge_shards)
        if not math.isfinite(penalty) or penalty < 0:
            raise ValueError(f"value_ridge {penalty}: must be a finite penalty >= 0 (0: the values are no ridge fit)")
        if shards < 1:
            raise ValueError(f"value_ridge_shards {shards}: must be at least 1")

    @property
    def config(self) -> dict:
        return {**asdict(self.model_config), "input_dim": self.input_dim, "num_classes": self.num_classes,
                "seed": self.seed}

    @property
    def key_mask(self) -> Tensor:
        return self.bottleneck.key_mask

    def prepare(self, x: Tensor, y: Tensor | None = None) -> None:
        """Initialise keys by k-means on the training embeddings (their labels ``y`` are used by
        the ``discriminant`` projection only)."""
        self.bottleneck.init_keys(x, y, niter=self.model_config.kmeans_iters)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.bottleneck.lookup(x))

    def decode(self, indices: Tensor) -> Tensor:
        """Logits from selected key indices (N, C, topk): lets a caller reuse one lookup."""
        return self.decoder(self.bottleneck.pool(self.bottleneck.flat_indices(indices)))

    @torch.no_grad()
    def keep_logits(self, x: Tensor, cands: Candidates | None = None) -> "KeptLogits":
        """Logits of ``x`` kept with what they came from, for :meth:`predict_from` on copies of
        this model; ``cands``: ``bottleneck.candidates(x)`` under the current mask (searched here
        if not given)."""
        self.eval()
        cands = self.bottleneck.candidates(x) if cands is None else cands
        if not torch.equal(cands.mask.to(self.key_mask.device), self.key_mask):
            raise ValueError("keep_logits: the candidates were searched under another key mask than this model's")
        logits = self.decoder(self.bottleneck.pool(self.bottleneck.select_flat(x, cands)))
        return KeptLogits(cands, logits, self.bottleneck.value_table().detach().clone(),
                          {k: v.detach().clone() for k, v in self.decoder.state_dict().items()})

    @torch.no_grad()
    def predict_from(self, x: Tensor, kept: "Candidates | KeptLogits") -> Tensor:
        """Logits of ``x`` from candidates kept by ``bottleneck.candidates(x)`` (on this model or
        one sharing its keys): no fresh search unless the mask leaves a row without candidates.

        Given :class:`KeptLogits` (from :meth:`keep_logits` on a model sharing these keys), only
        the rows whose kept selection holds a key that is now masked or whose value changed are
        computed again; every other row keeps its logits, which are what a full evaluation gives
        it (its keys and their values are the same). A changed decoder, or a key unmasked since,
        means every row is computed again.
        """
        self.eval()
        b = self.bottleneck
        if isinstance(kept, Candidates):
            return self.decoder(b.pool(b.select_flat(x, kept)))
        if kept.logits.shape[0] != x.shape[0]:
            raise ValueError(f"predict_from: logits kept for {kept.logits.shape[0]} rows, got {x.shape[0]} embeddings")
        changed = self._changed_keys(kept)
        if changed is None:
            return self.decoder(b.pool(b.select_flat(x, kept.candidates)))
        rows, flat = b.select_flat(x, kept.candidates, changed)
        out = kept.logits.clone()
        if rows.numel():
            out[rows] = self.decoder(b.pool(flat))
        return out

    def _changed_keys(self, kept: "KeptLogits") -> np.ndarray | None:
        """(C * K,) bool: keys masked since ``kept`` or with other values now; ``None`` when every
        row must be computed again (a key unmasked, another decoder or other value shapes)."""
        b = self.bottleneck
        if bool((kept.candidates.mask & ~b.key_mask).any()) or kept.values.shape != b.values.shape:
            return None
        state = self.decoder.state_dict()
        if state.keys() != kept.decoder.keys() or not all(torch.equal(v, kept.decoder[k]) for k, v in state.items()):
            return None
        changed = (b.key_mask & ~kept.candidates.mask).flatten()
        changed |= (b.value_table().detach() != kept.values).any(-1).flatten()
        return changed.cpu().numpy()

    @torch.no_grad()
    def compute_activation_counts(self, x: Tensor, y: Tensor, *, candidates: Candidates | None = None) -> Tensor:
        """Count and cache per-class key activations of the (training) embeddings ``x``.

        Counts are taken with no keys masked, so they describe the trained model and stay
        valid across later masking requests; ``candidates`` reuses ``bottleneck.candidates(x)``
        searched with no key masked, else the ``topk + CODE_EXTRA`` nearest keys are searched
        (about 2x a lookup's time). The search is kept as :attr:`code_cache` for re-fitting.
        """
        b = self.bottleneck
        if candidates is None:
            mask = b.key_mask.clone()
            b.key_mask.zero_()
            try:
                self.code_cache = self.search_codes(x, CODE_EXTRA)
            finally:
                b.key_mask.copy_(mask)
        elif bool(candidates.mask.any()):
            raise ValueError("compute_activation_counts: the candidates must be searched with no key masked")
        else:
            self.keep_codes(x, candidates)
        self.activation_counts = b.activation_counts(x, y, self.num_classes, candidates=self.code_cache.candidates)
        self.activation_totals()  # summed here, with the counts, so requests compare with it at no cost
        return self.activation_counts

    def activation_totals(self) -> tuple[Tensor, int]:
        """(totals, additions): each key's activations over all classes, ``activation_counts.sum(0)``
        (C, K), summed once per count table and kept, and the additions this call made (0 once
        kept). The share rule
        compares every request with it: summing CIFAR-100's (100, 512, 256) table took 11 ms of a
        request. The sum is kept with the count table it was made from (copies of the model, which
        share or copy that table, keep it too) and made again for any other table."""
        counts = self.activation_counts
        if self._totals is not None and self._totals[0] is counts:
            return self._totals[1], 0
        self._totals = (counts, counts.sum(0))
        return self._totals[1], counts.numel()

    @torch.no_grad()
    def search_codes(self, x: Tensor, extra: int = 0, *, digest: str | None = None) -> CodeCache:
        """A :class:`CodeCache` of embeddings ``x`` from one search under the current key mask
        (``extra`` candidates beyond ``topk``), not kept; ``digest``: ``fingerprint(x)`` if known."""
        whitened = self.bottleneck.whiten_rows(x)
        return self._code_cache(x, self.bottleneck.candidates(whitened, extra, whitened=True), whitened, digest)

    def keep_codes(self, x: Tensor, candidates: Candidates) -> None:
        """Keep ``candidates`` (``bottleneck.candidates(x)``) of embeddings ``x`` as :attr:`code_cache`."""
        self.code_cache = self._code_cache(x, candidates, self.bottleneck.whiten_rows(x))

    def _code_cache(self, x: Tensor, candidates: Candidates, whitened: Tensor, digest: str | None = None) -> CodeCache:
        """The :class:`CodeCache` of every row of ``x``; ``whitened`` (``whiten_rows(x)``) is kept
        only where the bottleneck whitens (else it is ``x`` itself, read from the caller's set)."""
        return CodeCache(digest or fingerprint(x), candidates, whitened if self.bottleneck.whitening.numel() else None,
                         torch.ones(len(x), dtype=torch.bool))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


__all__ = ["ModelConfig", "MeanDecoder", "MLPDecoder", "CODE_EXTRA", "CodeCache", "KeptLogits", "DKVBClassifier"]
