"""Erasing values from kept versions: zero the value rows of erased keys in a version's own tensors
file, in place, and bring every version that shares tensors with it in line.

Versions are otherwise immutable; this is the one rewrite, done by ``dkvb prune`` after the prune
record that names it is logged (:meth:`dkvb.service.ModelService.prune`). :func:`erase_rows` is
idempotent and reads the tensors file without verifying it, so a rewrite killed half-way (the
tensors replaced, a manifest not yet) is completed by running it again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import StoreError
from ..io import atomic_write_bytes, file_mode, fsync_dir, fsync_file, sha256_file
from .digests import manifest_sha256, state_sha256, tensor_sha256
from .layout import MANIFEST, TENSORS, list_versions
from .read import load_tensors, read_manifest

VALUES = "bottleneck.values"


def _zeroed(values: Tensor, rows: list[int]) -> Tensor:
    """``values`` (codebooks, keys, dim) with the flat key indices ``rows`` set to zero."""
    out = values.clone()
    flat = out.view(-1, out.shape[-1])
    flat[torch.as_tensor([r for r in rows if r < flat.shape[0]], dtype=torch.long)] = 0
    return out


def holding(values: Tensor | None, rows: list[int]) -> int:
    """How many of the flat key indices ``rows`` have non-zero values in ``values``."""
    if values is None or values.ndim != 3 or not rows:
        return 0
    flat = values.reshape(-1, values.shape[-1])
    index = torch.as_tensor([r for r in rows if r < flat.shape[0]], dtype=torch.long)
    return int(flat[index].ne(0).any(dim=1).sum())


def erasure_plan(root: str | os.PathLike, versions: Iterable[str], rows: list[int]) -> dict[str, Any]:
    """What erasing ``rows`` from ``versions`` changes: ``erased_in`` (the versions whose own values
    hold some of them, with how many) and ``model_sha256`` (the new model digest of every version
    whose model changes: those and the versions sharing their values)."""
    root = Path(root)
    erased, digests = {}, {}
    for version in versions:
        own, manifest = load_tensors(root, version, shared=False)
        held = holding(own.get(VALUES), rows)
        if not held or not isinstance(manifest.get("tensor_sha256"), dict):  # a format-1 version: not rewritten
            continue
        erased[version] = held
        new = tensor_sha256(_zeroed(own[VALUES], rows))
        digests[version] = state_sha256({**manifest["tensor_sha256"], VALUES: new})
        for other in list_versions(root):
            info = read_manifest(root, other).get("shared")
            if isinstance(info, dict) and info.get("version") == version and VALUES in info.get("tensors", []):
                m = read_manifest(root, other)
                digests[other] = state_sha256({**m["tensor_sha256"], VALUES: new})
    return {"erased_in": erased, "model_sha256": digests}


def erase_rows(root: str | os.PathLike, version: str, rows: list[int]) -> None:
    """Zero ``rows`` of ``version``'s own values in place (tensors file, then manifest), then point
    every version sharing its tensors at the new file. Idempotent."""
    root = Path(root)
    vdir = root / "versions" / version
    try:
        own = load_file(str(vdir / TENSORS))
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        raise StoreError(f"{vdir / TENSORS}: unreadable tensors ({e})") from None
    if VALUES not in own:
        raise StoreError(f"{vdir / TENSORS}: holds no {VALUES} to erase")
    own[VALUES] = _zeroed(own[VALUES], rows)
    tmp = vdir / f".{TENSORS}.erase.tmp"
    save_file(own, str(tmp))
    os.chmod(tmp, file_mode())
    fsync_file(tmp)
    file_sha, values_sha = sha256_file(tmp), tensor_sha256(own[VALUES])
    os.replace(tmp, vdir / TENSORS)
    fsync_dir(vdir)
    manifest = read_manifest(root, version)
    manifest["sha256"][TENSORS] = file_sha
    manifest["tensor_sha256"][VALUES] = values_sha
    manifest["model_sha256"] = state_sha256(manifest["tensor_sha256"])
    _write_manifest(vdir, manifest)
    for other in list_versions(root):
        m = read_manifest(root, other)
        info = m.get("shared")
        if not isinstance(info, dict) or info.get("version") != version:
            continue
        info["sha256"] = file_sha
        if VALUES in info.get("tensors", []):
            m["tensor_sha256"][VALUES] = values_sha
            m["model_sha256"] = state_sha256(m["tensor_sha256"])
        _write_manifest(root / "versions" / other, m)


def needs_finishing(root: str | os.PathLike, erased_in: Iterable[str], digests: dict[str, str]) -> list[str]:
    """The versions of a logged erasure whose manifests do not yet show it (a prune killed while
    rewriting): a model digest other than the logged one, or a version sharing its tensors that
    names another file digest."""
    root = Path(root)
    existing = set(list_versions(root))
    left = []
    for version in erased_in:
        if version not in existing:
            continue
        manifest = read_manifest(root, version)
        stale = manifest.get("model_sha256") != digests.get(version)
        for other in existing:
            info = read_manifest(root, other).get("shared")
            if isinstance(info, dict) and info.get("version") == version:
                stale = stale or info.get("sha256") != manifest["sha256"][TENSORS]
        if stale:
            left.append(version)
    return left


def _write_manifest(vdir: Path, manifest: dict[str, Any]) -> None:
    manifest.pop("manifest_sha256", None)
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    atomic_write_bytes(vdir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


__all__ = ["erasure_plan", "erase_rows", "needs_finishing", "holding"]
