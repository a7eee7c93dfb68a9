"""Algorithm 1 of Shah et al. (TMLR 2025): unlearning via activations.

Count, for every key, how often the training embeddings of each class select it; mask the
keys the forget class selects most. The counts are computed once per model and cached on it
(``model.activation_counts``), so every later request costs a few tensor reductions over the
C x K count table and no forward pass.

Two rules pick the keys (``rule``):

- ``"paper"``: Algorithm 1 as written. Only the forget classes' activations count; the N_A
  most activated key-value pairs are masked, whatever other classes do with them. The paper
  does not say whether N_A is per codebook or over all codebooks, so ``scope`` offers both.
- ``"share"`` (default, ours): only keys on which the forget classes hold at least a share of
  all activations are eligible, then the top N_A of those (or all of them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..data import EmbeddingSet
from ..flops import lookup_flops, note_images
from ..models import DKVBClassifier
from ..validate import require, require_choice, require_count
from .base import ForgetRequest, register
from .masking import MaskingUnlearner, mask_summary, masked_copy


# The default rule's threshold, in units of a uniform class mix's share, per projection of the
# bottleneck. Discriminant keys follow the classes, so the keys next to a forget class's own hold a
# small share of it, enough (summed over every codebook) to keep predicting it: they must be masked
# too, hence a lower bar.
# Trades complete forgetting (lower) against retain accuracy and keys left for later requests
# (higher): docs/quality.md#share-factor, docs/quality.md#share-factor-whitened
SHARE_FACTOR = {"discriminant": 0.5, "whitened": 1.25, "pca": 1.25, "random": 1.25}
# With a probe start (``value_init="probe"``) a masking request first takes the class out of the
# start (:func:`~dkvb.unlearn.masking.remove_start`), which alone stops its predictions; the mask
# only has to reach the keys where training put the class's own examples, and every key it spends
# is capacity later requests lack. So such a model masks the keys where the class holds at least a
# uniform share and at least a tenth of the activations (the same rule up to 10 classes; with 100
# the floor of a tenth decides). Releasing keys costs no capacity and keeps the projection's factor.
# Trades what the mask removes of the class's training residue (lower) against keys left for
# later requests (higher; every factor 0.5-3.0 forgets): docs/quality.md#start-share-factor
START_SHARE_FACTOR = 1.0
# Trades keys left for later requests against the residue on lightly shared keys (CIFAR-100: 0.1
# serves all 50 requests of a sequence, a uniform share ran out at the 8th): docs/quality.md#start-min-share
START_MIN_SHARE = 0.1


def default_share(model: DKVBClassifier, num_forget: int, *, start_factor: bool = True) -> float:
    """The default rule's ``min_share`` for ``model``: :data:`SHARE_FACTOR` of its projection times
    the forget classes' share of a uniform class mix; for a probe-started model, unless
    ``start_factor`` is False (keys that are released rather than kept masked, and records logged
    before commit e812c6f, 2026-11-28, which hold no resolved share), at least
    :data:`START_SHARE_FACTOR` times that share and at least
    :data:`START_MIN_SHARE` per forget class (at most 1)."""
    per_class = SHARE_FACTOR[model.bottleneck.projection_kind] / model.num_classes
    if model.bottleneck.start.is_set and start_factor:
        per_class = max(per_class, START_SHARE_FACTOR / model.num_classes, START_MIN_SHARE)
    return min(1.0, per_class * num_forget)


@register("dkvb-activations")
@dataclass
class UnlearnViaActivations(MaskingUnlearner):
    """Mask keys by their activation counts on the forget classes' training embeddings.

    Attributes:
        rule: ``"share"`` (default, ours: the share filter below, then top N_A) or ``"paper"``
            (Algorithm 1: top N_A by forget-class counts alone, no share filter; ``min_share``
            must then be left unset).
        num_keys: N_A, the number of most-activated keys to mask (per codebook or in all, see
            ``scope``); ``None`` masks every eligible key. Keys the forget classes activate
            fewer than ``min_count`` times are never masked, so a codebook may get fewer.
        scope: ``"codebook"`` (default): N_A keys in every codebook; ``"all"``: the N_A most
            activated (codebook, key) pairs over all codebooks together.
        min_share: ``rule="share"`` only: only keys whose activations come from the forget
            classes for at least this share (0..1) are eligible; 0 masks every key the forget classes touch, shared keys too.
            ``None`` (default) uses :func:`default_share`: :data:`SHARE_FACTOR` times the forget
            classes' share of a uniform class mix, ``len(forget_classes) / num_classes``. The
            factor depends on the bottleneck's projection and was chosen on validation splits
            of Fashion-MNIST (60k and 4k), CIFAR-10 (50k and 4k), CIFAR-100 and digits
            (docs/quality.md#share-factor): 0.5 for ``discriminant`` (1.0 leaves 19% forget-validation on
            Fashion-MNIST), 1.25 for ``whitened`` (1.0 costs CIFAR-10 1.65 retain points, 1.5
            stops forgetting); a probe-started model that keeps the keys masked uses at least
            :data:`START_SHARE_FACTOR` (1.0) and at least :data:`START_MIN_SHARE` (a tenth) per
            forget class, since taking the class out of the start does the forgetting there and
            fewer masked keys leave room for later requests (CIFAR-100: all 50 of a sequence).
        min_count: a key must be activated this many times by the forget classes to be eligible.
        use_cached_counts: use (and fill) the per-class count table cached on the model, so a
            request costs no lookup at all; ``False`` runs Algorithm 1 from scratch: look up the
            forget classes' training embeddings (all training embeddings for the share rule
            with ``min_share != 0``, which compares the forget classes with every class).
        erase_values, refit_epochs, refit_lr: see :class:`~dkvb.unlearn.masking.MaskingUnlearner`.
    """

    rule: Literal["share", "paper"] = "share"
    num_keys: int | None = None
    scope: Literal["codebook", "all"] = "codebook"
    min_share: float | None = None
    min_count: int = 1
    use_cached_counts: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice(self.name, "rule", self.rule, ("share", "paper"))
        require_choice(self.name, "scope", self.scope, ("codebook", "all"))
        require(self.rule == "share" or self.min_share is None, self.name, "min_share",
                "None with rule='paper' (the share filter is the 'share' rule's; 'paper' has none)", self.min_share)
        if self.num_keys is not None:
            require_count(self.name, "num_keys", self.num_keys)
        if self.min_share is not None:
            require(0 <= self.min_share <= 1, self.name, "min_share", "in [0, 1]", self.min_share)
        require_count(self.name, "min_count", self.min_count)

    def _unlearn(self, model: DKVBClassifier, request: ForgetRequest) -> tuple[DKVBClassifier, int, dict[str, Any]]:
        flops, cached = 0, self.use_cached_counts and model.activation_counts.numel() > 0
        if cached:
            counts = model.activation_counts
        elif self.use_cached_counts:
            counts = model.compute_activation_counts(request.train.x, request.train.y)
            flops += lookup_flops(model, len(request.train))
            note_images(len(request.train))
        else:
            # the share rule needs every class's counts; the paper's rule the forget classes' only
            data = request.forget if self.rule == "paper" or self.min_share == 0 else request.train
            counts = _unmasked_counts(model, data)
            flops += lookup_flops(model, len(data))
            note_images(len(data))
        forget = counts[list(request.forget_classes)].sum(0)  # (C, K)
        eligible = forget >= self.min_count
        c, k = forget.shape
        # Reductions over the (classes, C, K) count table: one add per forget-class entry for
        # the sum, a comparison per key for eligibility and one for the top-N selection.
        flops += (len(request.forget_classes) + 2) * c * k
        if self.rule == "share":
            share = (default_share(model, len(request.forget_classes), start_factor=not self.release_keys)
                     if self.min_share is None else self.min_share)
            # The per-key total over all classes, kept with the model's count table (summed where the
            # table is made or loaded). Counted where this request summed it: always for a table it
            # made itself, for a cached table only if nothing had summed it yet.
            if counts is model.activation_counts:
                total, summed = model.activation_totals()
                summed = summed if cached else counts.numel()
            else:
                total, summed = counts.sum(0), counts.numel()
            eligible &= forget >= share * total
            flops += summed + c * k  # that sum, and the share test
        new_mask = eligible if self.num_keys is None else eligible & _top(forget, eligible, self.num_keys, self.scope)
        out, refit_flops, refit = self._finish(model, new_mask, request)
        resolved = {"min_share": share} if self.rule == "share" and self.min_share is None else {}
        return out, flops + refit_flops, {"counts_cached": cached, **mask_summary(out.key_mask & ~model.key_mask),
                                          "mask": new_mask, **refit, "resolved_params": resolved}


def _top(score: torch.Tensor, eligible: torch.Tensor, n: int, scope: str) -> torch.Tensor:
    """(C, K) mask of the ``n`` highest eligible scores per codebook (``scope="codebook"``) or
    over the whole table (``scope="all"``); ties go to the lower key index."""
    ranked = torch.where(eligible, score, torch.full_like(score, -1))
    flat = ranked if scope == "codebook" else ranked.view(1, -1)
    top = flat.topk(min(n, flat.shape[1]), dim=1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True).view_as(score)


def _unmasked_counts(model: DKVBClassifier, data: EmbeddingSet) -> torch.Tensor:
    """Per-class counts over ``data`` with no key masked, without touching the model's cache."""
    probe = masked_copy(model, torch.zeros_like(model.key_mask), share_values=True)  # only counted, never trained
    probe.bottleneck.key_mask.zero_()
    return probe.bottleneck.activation_counts(data.x, data.y, model.num_classes)
