"""Digests of a stored model: per tensor (dtype, shape, bytes), of the whole state, of a manifest."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import torch
from torch import Tensor, nn


def tensor_sha256(t: Tensor) -> str:
    """Digest of a tensor's dtype, shape and bytes (independent of how it is stored on disk)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def state_sha256(digests: Mapping[str, str]) -> str:
    """The model digest: sha256 over the per-tensor digests, sorted by tensor name."""
    return hashlib.sha256(json.dumps(dict(sorted(digests.items()))).encode()).hexdigest()


def model_sha256(model: nn.Module) -> str:
    """Digest of a module's full state; equals the manifest's ``model_sha256`` of a saved copy."""
    return state_sha256({k: tensor_sha256(v) for k, v in model.state_dict().items()})


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """Digest of a manifest's fields other than ``manifest_sha256`` (class names and extra included)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

