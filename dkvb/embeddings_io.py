"""Embeddings with labels from files, for requests against a stored model (``dkvb forget``/``replay``/
``verify``): ``.pt``/``.pth``, ``.safetensors``, ``.npz``, ``.npy`` or an embedding-cache folder.

A cache folder (:mod:`dkvb.cache`) and an experiment config say which encoder setting made the
embeddings (name, image size, preprocessing); a ``.pt``/``.safetensors``/``.npz`` file says it with
an ``encoder`` entry beside ``x`` and ``y`` (the encoder's name, or its description as a dict or
JSON text: :func:`dkvb.encoders.encoder_config`; in a ``.safetensors`` file, the ``encoder``
metadata field). :func:`check_encoder` refuses embeddings made with another setting than the
stored model's, which would put the request's examples in another space than the one the model's
keys live in. A file without an ``encoder`` entry (and every ``.npy``) is refused for a stored
model unless the caller trusts it explicitly (``trust=True``, ``--trust-embeddings``); the
embedding size is checked against the model's in every case.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .data import EmbeddingSet


TRUST_FLAG = "--trust-embeddings"


def load_embeddings_file(path: str | os.PathLike, class_names: Sequence[str],
                         encoder: Mapping[str, Any] | None = None, *, trust: bool = False) -> EmbeddingSet:
    """Embeddings with labels from a file: ``.pt``/``.pth`` or ``.safetensors`` or ``.npz`` holding
    ``x`` and ``y``; ``.npy`` holding ``x`` with labels in ``labels.npy`` (beside ``embeddings.npy``)
    or ``<stem>_labels.npy``; or a cached split folder of :mod:`dkvb.cache`.

    ``encoder`` (a stored model's manifest) is checked against the encoder the file or folder
    names and against the embedding size; a file that names no encoder is refused then unless
    ``trust``, and so is a file naming only the encoder's name where the model records its full
    setting. A cache folder (and a file with a ``class_names`` entry) must hold the model's class
    names in its order. Raises ``ValueError`` naming the file and the problem (missing arrays, wrong
    shapes, NaN/inf, labels out of range, another encoder or setting, no encoder named, other
    classes, another embedding size) and ``FileNotFoundError``.
    """
    p = Path(path)
    if p.is_dir():
        from .cache import load_cached, read_meta

        meta = read_meta(p)
        if encoder is not None:
            check_encoder(meta.get("encoder"), encoder, str(p))
        _check_names(meta.get("class_names"), class_names, p, trust)
        data = load_cached(p, class_names)
        _check_dim(data.x, encoder, p)
        _check_finite(data.x, p)
        return data
    if not p.is_file():
        raise FileNotFoundError(f"embeddings file not found: {p}")
    suffix, described = p.suffix.lower(), None
    try:
        if suffix in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
            x, y = _pick(obj, p)
            described = obj.get("encoder")
            if "class_names" in obj:
                _check_names(obj["class_names"], class_names, p, False)
        elif suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            x, y = _pick(load_file(str(p)), p)
            with safe_open(str(p), "pt") as f:
                described = (f.metadata() or {}).get("encoder")
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                x, y = _pick({k: z[k] for k in z.files}, p)
                described = z["encoder"].item() if "encoder" in z.files else None
        elif suffix == ".npy":
            labels = p.with_name("labels.npy") if p.name == "embeddings.npy" else p.with_name(f"{p.stem}_labels.npy")
            if not labels.is_file():
                raise ValueError(f"{p}: labels not found (expected {labels})")
            x, y = np.load(p, allow_pickle=False), np.load(labels, allow_pickle=False)
        else:
            raise ValueError(f"{p}: unsupported embeddings file (use .pt, .safetensors, .npz, .npy or a cache folder)")
    except ValueError:
        raise
    except Exception as e:  # unpickling/format errors of the readers above
        raise ValueError(f"{p}: unreadable embeddings ({type(e).__name__}: {e})") from e
    if encoder is not None:
        _check_file_encoder(described, encoder, p, trust)
    x, y = torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y))
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)) or x.ndim != 2:
        raise ValueError(f"{p}: x must be a 2-D float array (N, D), got {tuple(x.shape)} {x.dtype}")
    if y.is_floating_point() or y.dtype == torch.bool or y.ndim != 1:
        raise ValueError(f"{p}: y must be a 1-D integer array, got {tuple(y.shape)} {y.dtype}")
    x = x.float()
    _check_dim(x, encoder, p)
    _check_finite(x, p)
    try:
        return EmbeddingSet(x, y.long(), tuple(class_names))
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None


def check_encoder(described: Any, manifest: Mapping[str, Any], where: str) -> None:
    """Refuse embeddings whose encoder description (a cache's ``encoder`` dict, or ``None`` when
    unknown) differs from the model's: the manifest's ``encoder`` name, and its full
    ``encoder_config`` (image size, preprocessing, weights) where the manifest records one."""
    if not isinstance(described, Mapping):
        return
    name, full = manifest.get("encoder"), manifest.get("encoder_config")
    if isinstance(full, Mapping):
        diff = sorted(k for k in set(full) | set(described) if full.get(k) != described.get(k))
        if diff:
            raise ValueError(f"{where}: embeddings made with another encoder setting than the model's (fields "
                             f"{diff}: {[described.get(k) for k in diff]} vs the model's {[full.get(k) for k in diff]})")
    elif name is not None and described.get("name") != name:
        raise ValueError(f"{where}: embeddings made with encoder {described.get('name')!r}, the model was trained on "
                         f"{name!r} embeddings")


def _check_file_encoder(described: Any, manifest: Mapping[str, Any], p: Path, trust: bool) -> None:
    """Check a file's ``encoder`` entry (a name, or a description as a dict or JSON text) against a
    stored model's manifest; refuse a file without one unless ``trust``."""
    if isinstance(described, str) and described.lstrip().startswith("{"):
        try:
            described = json.loads(described)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: its 'encoder' entry is not valid JSON ({e})") from None
    if isinstance(described, str):
        described = {"name": described}
    if described is None:
        if trust:
            return
        raise ValueError(f"{p}: the file does not say which encoder made these embeddings (no 'encoder' entry), so "
                         f"they cannot be checked against the model's encoder {manifest.get('encoder')!r}; add an "
                         f"'encoder' entry (the encoder's name) beside x and y, or pass {TRUST_FLAG} to use them "
                         "unchecked")
    if not isinstance(described, Mapping):
        raise ValueError(f"{p}: its 'encoder' entry must be the encoder's name or description, got "
                         f"{type(described).__name__}")
    full = manifest.get("encoder_config")
    if isinstance(full, Mapping) and set(described) == {"name"}:
        check_encoder(described, {"encoder": manifest.get("encoder")}, str(p))
        if trust:
            return
        settings = {k: v for k, v in full.items() if k != "name"}
        raise ValueError(f"{p}: the file names only the encoder ({described['name']!r}); the model records its full "
                         f"setting ({settings}), which a name does not pin (another image size or preprocessing "
                         f"puts the embeddings in another space): store dkvb.encoders.encoder_config(...) as its "
                         f"'encoder' entry, or pass {TRUST_FLAG} to use them unchecked")
    if not isinstance(full, Mapping):
        manifest = {"encoder": manifest.get("encoder")}  # a model that records only a name: checked against it
    check_encoder(described, manifest, str(p))


def _check_names(described: Any, class_names: Sequence[str], p: Path, trust: bool) -> None:
    """Embeddings must carry the model's classes, in its order: labels are indices into them. A
    cache folder from another dataset (other names, another count) is refused."""
    if described is None:
        if trust:
            return
        raise ValueError(f"{p}: does not say which classes its labels index (no class_names); pass {TRUST_FLAG} to "
                         "use it unchecked")
    names = [str(n) for n in described] if isinstance(described, (list, tuple)) else None
    if names != [str(n) for n in class_names]:
        got = f"{len(names)} classes {names[:5]}" if names is not None else repr(described)[:80]
        raise ValueError(f"{p}: its labels index {got}, the model has {len(class_names)} classes "
                         f"{list(class_names)[:5]}: embeddings of another dataset or class order")


def _check_dim(x: Tensor, manifest: Mapping[str, Any] | None, p: Path) -> None:
    dim = manifest.get("embedding_dim") if manifest is not None else None
    if dim is not None and x.ndim == 2 and x.shape[1] != dim:
        raise ValueError(f"{p}: embeddings have {x.shape[1]} dimensions, the model takes {dim} (manifest field "
                         "embedding_dim); they were made by another encoder or setting")


def _pick(obj: Any, p: Path) -> tuple[Any, Any]:
    if not isinstance(obj, dict) or "x" not in obj or "y" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{p}: expected arrays 'x' (embeddings) and 'y' (labels), found {keys}")
    return obj["x"], obj["y"]


def _check_finite(x: Tensor, p: Path) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{p}: embeddings contain NaN or inf values")


def embeddings_from_config(
    path: str | os.PathLike, overrides: list[str] | None = None, manifest: Mapping[str, Any] | None = None,
) -> tuple[EmbeddingSet, EmbeddingSet]:
    """(train, test) embeddings of an experiment config, from its embedding cache; with ``manifest``,
    refused when the config's encoder setting differs from the stored model's."""
    from .config import load_config
    from .encoders import encoder_config
    from .experiment import load_embeddings

    cfg = load_config(path, overrides)
    if manifest is not None:
        e = cfg.encoder
        check_encoder(encoder_config(e.name, image_size=e.image_size, pretrained=e.pretrained), manifest, str(path))
    return load_embeddings(cfg, progress=False)


__all__ = ["load_embeddings_file", "embeddings_from_config", "check_encoder", "TRUST_FLAG"]
