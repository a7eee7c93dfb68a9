"""Shared by both DKVB unlearners: copy a model with more keys masked, and describe a mask."""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..models import DKVBClassifier


def masked_copy(model: DKVBClassifier, new_mask: Tensor, *, erase_values: bool = False) -> DKVBClassifier:
    """A copy of ``model`` whose key mask is ``model.key_mask | new_mask``.

    The frozen tensors (keys, projection, cached activation counts) are shared with the
    original, which is safe because nothing writes to them after key initialisation; values
    and decoder are copied so later training of the copy cannot touch the original.
    ``erase_values`` also zeroes the values of the newly masked keys, so the copy's weights no
    longer hold what those keys learned (clearing the mask then gives nothing back).
    """
    b = model.bottleneck
    mask = model.key_mask | new_mask.to(model.key_mask.device)
    check_selectable(mask, b.topk)
    memo = {id(t): t for t in (b.keys, b.projection, b.whitening, model.activation_counts)}
    out = copy.deepcopy(model, memo)
    out.bottleneck.key_mask = mask
    if erase_values:
        with torch.no_grad():
            out.bottleneck.values[new_mask.to(mask.device)] = 0.0
    return out


def check_selectable(mask: Tensor, topk: int = 1) -> None:
    """ValueError if a mask leaves some codebook with fewer than ``topk`` keys to select."""
    full = (~mask).sum(dim=1) < topk
    if bool(full.any()):
        raise ValueError(
            f"unlearning would leave codebook {int(full.nonzero()[0])} with fewer than topk={topk} unmasked keys "
            "(every key masked): the model could no longer "
            "predict anything; forget fewer classes, use fewer examples/rounds, or a larger codebook_size"
        )


def mask_summary(mask: Tensor) -> dict[str, object]:
    """JSON-friendly description of a (C, K) mask."""
    per_codebook = mask.sum(1)
    return {
        "keys_masked": int(mask.sum()),
        "keys_total": int(mask.numel()),
        "codebooks_touched": int((per_codebook > 0).sum()),
        "max_masked_in_a_codebook": int(per_codebook.max()) if mask.numel() else 0,
    }
