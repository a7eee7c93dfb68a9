"""Reading a model store: manifests, verified tensors and models.

Loading verifies the manifest, the checksums of its files and the digest of every tensor read
(so a manifest's ``model_sha256`` is the model's), and names the field that does not match. Readers
take no lock: versions are immutable and ``HEAD`` is replaced atomically. A caller that loads many
versions passes a ``cache`` dict so each full version is read and hashed once. A shared version's
tensors are verified against both files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .. import audit
from ..errors import AuditError, StoreError
from ..io import sha256_file
from ..models import build_model
from .digests import manifest_sha256, state_sha256, tensor_sha256
from .layout import CONFIG, MANIFEST, READABLE_FORMATS, TENSORS, VERSION_NAME, version_dir, warn_broken_head


def read_manifest(path: str | os.PathLike, version: str | None = None) -> dict[str, Any]:
    """The manifest of ``version`` (default: ``HEAD``) without loading tensors."""
    vdir = version_dir(Path(path), version)
    try:
        manifest = json.loads((vdir / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise StoreError(f"{vdir}: manifest.json is missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{vdir / MANIFEST}: corrupt manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise StoreError(f"{vdir / MANIFEST}: corrupt manifest (not a JSON object)")
    return manifest


def load_tensors(
    path: str | os.PathLike,
    version: str | None = None,
    *,
    shared: bool = True,
    cache: dict[str, tuple] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Verified tensors of a version and its manifest.

    Args:
        shared: also return the tensors the version shares with its full version (``False``
            reads only its own file).
        cache: ``{full version: (sha256 of its tensors file, tensors, their verified digests)}`` of
            full versions already verified in this process; consulted before hashing a base file
            again and filled after.
            Versions are immutable, so a long-lived caller (:class:`dkvb.service.ModelService`)
            verifies each full version once; the version's own file is always verified.
    """
    root = Path(path)
    vdir = version_dir(root, version)
    manifest = read_manifest(root, vdir.name)
    fmt = manifest.get("format_version")
    if type(fmt) is not int or fmt not in READABLE_FORMATS:
        raise StoreError(
            f"{vdir}: manifest field format_version is {manifest.get('format_version')!r}, "
            f"this dkvb reads {' or '.join(map(str, READABLE_FORMATS))}"
        )
    sums = manifest.get("sha256")
    if not isinstance(sums, dict) or not isinstance(sums.get(TENSORS), str):
        raise StoreError(f"{vdir / MANIFEST}: manifest field sha256.{TENSORS} is missing")
    info = manifest.get("shared")
    digests = manifest.get("tensor_sha256") if fmt >= 2 else None
    if digests is not None and not isinstance(digests, dict):
        raise StoreError(f"{vdir / MANIFEST}: manifest field tensor_sha256 is not a mapping")
    if cache is not None and info is None and cache.get(vdir.name, ("",))[0] == sums[TENSORS]:
        state = dict(cache[vdir.name][1])
        for name, digest in sums.items():
            if name != TENSORS:
                _check_file(vdir / name, digest, f"sha256.{name}")
        _check_digests(state, digests, _verified(cache, vdir.name), vdir)
        return state, manifest
    for name, digest in sums.items():
        _check_file(vdir / name, digest, f"sha256.{name}")
    state = _read_tensors(vdir / TENSORS)
    _check_digests(state, digests, {}, vdir)
    if cache is not None and info is None:
        cache[vdir.name] = (sums[TENSORS], dict(state), _digests_of(state, digests))
    if shared and info is not None:
        try:
            full, digest, names = info["version"], info["sha256"], list(info["tensors"])
        except (KeyError, TypeError) as e:
            raise StoreError(f"{vdir / MANIFEST}: manifest field shared is malformed ({e!r})") from e
        if not isinstance(full, str) or not VERSION_NAME.match(full) or full == vdir.name:
            raise StoreError(f"{vdir / MANIFEST}: manifest field shared.version is {full!r}, not another version")
        fdir = version_dir(root, full)
        cached = cache is not None and cache.get(full, ("",))[0] == digest
        if cached:
            base, known = cache[full][1], _verified(cache, full)
        else:
            _check_file(fdir / TENSORS, digest, f"shared.sha256 of {vdir / MANIFEST}")
            base, known = _read_tensors(fdir / TENSORS), {}
        missing = [n for n in names if n not in base]
        if missing:
            raise StoreError(f"{fdir / TENSORS}: lacks shared tensor(s) {missing} (manifest field shared.tensors)")
        taken = {n: base[n] for n in names}
        _check_digests(taken, digests, known, vdir)
        if cache is not None and not cached:
            cache[full] = (digest, base, _digests_of(taken, digests))
        state = {**taken, **state}
    return state, manifest


def load_model(
    path: str | os.PathLike,
    version: str | None = None,
    *,
    expect_encoder: str | None = None,
    expect_dim: int | None = None,
    cache: dict[str, tuple] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load and verify a stored model; returns ``(model, manifest)``.

    ``cache`` is passed to :func:`load_tensors`. Raises :class:`StoreError` naming the field for a
    wrong format version, a checksum mismatch, an encoder or embedding size other than expected,
    a config that disagrees with the manifest, or unreadable tensors. Without ``version``, the
    served version (:func:`~dkvb.store.served_version`: the verified log's, for a served store),
    whose class names must be those its origin record logged.
    """
    root = Path(path)
    origin = last = None
    if version is None:
        state = audit.served_state(root) if root.is_dir() else None
        if state is not None:
            version, origin, last = state
            warn_broken_head(root, version)
    vdir = version_dir(root, version)
    state, manifest = load_tensors(root, vdir.name, cache=cache)
    for field in ("encoder", "embedding_dim", "num_classes", "class_names"):
        if field not in manifest:
            raise StoreError(f"{vdir / MANIFEST}: manifest field {field} is missing")
    if expect_encoder is not None and manifest["encoder"] != expect_encoder:
        raise StoreError(f"manifest field encoder is {manifest['encoder']!r}, expected {expect_encoder!r}")
    if expect_dim is not None and manifest["embedding_dim"] != expect_dim:
        raise StoreError(f"manifest field embedding_dim is {manifest['embedding_dim']}, expected {expect_dim}")
    names = manifest["class_names"]
    if not isinstance(names, list) or len(names) != manifest["num_classes"]:
        raise StoreError(f"{vdir / MANIFEST}: manifest field class_names does not list num_classes="
                         f"{manifest['num_classes']!r} names")
    if len(set(map(str, names))) != len(names):
        raise StoreError(f"{vdir / MANIFEST}: manifest field class_names has duplicates")
    digests = manifest.get("tensor_sha256")
    if manifest["format_version"] >= 2:  # the recorded names and model digest must agree with the tensors
        if not isinstance(digests, dict) or sorted(digests) != sorted(state):
            raise StoreError(f"{vdir / MANIFEST}: manifest field tensor_sha256 does not name the stored tensors")
        if state_sha256(digests) != manifest.get("model_sha256"):
            raise StoreError(f"{vdir / MANIFEST}: manifest field model_sha256 does not match tensor_sha256")
    try:
        config = json.loads((vdir / CONFIG).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{vdir / CONFIG}: unreadable config ({e})") from e
    if not isinstance(config, dict):
        raise StoreError(f"{vdir / CONFIG}: unreadable config (not a JSON object)")
    for field, key in (("input_dim", "embedding_dim"), ("num_classes", "num_classes"), ("kind", "kind")):
        if key in manifest and config.get(field) != manifest.get(key):
            raise StoreError(f"config field {field}={config.get(field)!r} disagrees with manifest field {key}")
    try:
        model = build_model(config, config["input_dim"], config["num_classes"], seed=config.get("seed", 0))
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{vdir / CONFIG}: cannot rebuild the model ({e!r})") from e
    counts = state.get("activation_counts")
    if counts is not None and hasattr(model, "activation_counts"):
        b = model.bottleneck
        if counts.numel() and tuple(counts.shape) != (model.num_classes, b.num_codebooks, b.codebook_size):
            raise StoreError(f"{vdir / TENSORS}: activation_counts has shape {tuple(counts.shape)}, expected "
                             f"{(model.num_classes, b.num_codebooks, b.codebook_size)} or empty")
        model.activation_counts = torch.zeros_like(counts)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise StoreError(f"{vdir / TENSORS}: tensors do not match config.json ({e})") from e
    if getattr(model, "activation_counts", None) is not None and model.activation_counts.numel():
        model.activation_totals()  # summed with the counts on loading, so a request does not pay for it
    if hasattr(model, "bottleneck"):
        b = model.bottleneck
        try:
            b.start.check()
            b.corrections.check()
            model.check_ridge()
        except ValueError as e:
            raise StoreError(f"{vdir / TENSORS}: {e}") from e
        b.start.fill_floor(b.keys)  # a start saved without its floor: filled once, on loading
    if manifest["format_version"] >= 3 and manifest.get("manifest_sha256") != manifest_sha256(manifest):
        raise StoreError(f"{vdir / MANIFEST}: manifest field manifest_sha256 does not match the manifest; "
                         "it was edited (class names, extra, ...)")
    if origin is not None:
        check_class_names(manifest, origin, vdir)
    logged = (last or {}).get("model_sha256_after") or (last or {}).get("model_sha256")
    if logged and (last or {}).get("op") != "prune" and manifest.get("model_sha256") not in (None, logged):
        raise AuditError(f"{vdir / MANIFEST}: manifest field model_sha256 differs from the digest the audit log's "
                         f"record {last['request_id']} holds for the served version; the version was rewritten")
    model.eval()
    return model, manifest


def check_class_names(manifest: dict[str, Any], origin: dict[str, Any], vdir: Path) -> None:
    """A served version's class names must be those its origin record logged (in order): the log
    holds them out of reach of someone who edits manifests and recomputes their digests."""
    logged = origin.get("class_names")
    if logged is not None and list(manifest.get("class_names", [])) != list(logged):
        diff = [i for i, (a, b) in enumerate(zip(manifest["class_names"], logged)) if a != b]
        raise AuditError(f"{vdir / MANIFEST}: manifest field class_names differs from the names the audit log's "
                         f"origin record {origin['request_id']} holds (at index {diff[:5] or len(logged)}); the "
                         "manifest was edited")


def _verified(cache: dict, version: str) -> dict[str, str]:
    """The tensor digests already verified for a cached full version."""
    entry = cache[version]
    return dict(entry[2]) if len(entry) > 2 else {}


def _digests_of(state: dict[str, Tensor], digests: dict[str, str] | None) -> dict[str, str]:
    return {n: digests[n] for n in state if digests is not None and n in digests}


def _check_digests(state: dict[str, Tensor], digests: dict[str, str] | None, known: dict[str, str],
                   vdir: Path) -> None:
    """Every tensor read must have the digest its manifest records (``tensor_sha256``), so the
    manifest's ``model_sha256`` is the model's; ``known`` holds digests already verified."""
    if digests is None:
        return
    for name, t in state.items():
        want = digests.get(name)
        got = known.get(name) or tensor_sha256(t)
        if want is not None and got != want:
            raise StoreError(f"{vdir / MANIFEST}: tensor {name} does not match manifest field tensor_sha256; "
                             "the tensors were rewritten")
        known.setdefault(name, got)


def _check_file(path: Path, digest: str, field: str) -> None:
    if not path.is_file():
        raise StoreError(f"{path.parent}: {path.name} is missing")
    if sha256_file(path) != digest:
        raise StoreError(f"{path}: checksum mismatch (manifest field {field}); the file is corrupt")


def _read_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable tensors ({e})") from e

