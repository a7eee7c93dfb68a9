"""Writing a model store: a new version, and moving ``HEAD``.

A save writes a new version folder completely (files fsynced) under a temporary name, renames it
into place and only then replaces ``HEAD``, so killing the writer at any point leaves either the
old or the new model; leftovers of a killed writer (``versions/.tmp-*``, ``.HEAD.*.tmp``) are
removed by the next save. Version names count up and are never reused, even after the newest
versions were deleted (``versions/.issued`` remembers the last one).

Shared tensors. ``save_model(..., base=VERSION)`` writes only the tensors that differ from the
full version ``VERSION`` rests on (for a masking unlearner: the key mask); the manifest's ``shared``
field names that version, the sha256 of its tensors file and the tensors taken from it. A shared
version is one level deep (its base is always a full version).

Served stores. :func:`save_model` refuses to move ``HEAD`` of a store with an audit log: a
retrained model would serve classes the log says are forgotten. :func:`dkvb.service.replace_model`
(``dkvb train/run --force``) replaces it with the logged forget requests re-applied.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

from .. import audit
from ..errors import StoreError
from ..io import atomic_write_text, file_mode, fsync_dir, fsync_file, sha256_file
from .digests import manifest_sha256, state_sha256, tensor_sha256
from .layout import CONFIG, FORMAT_VERSION, ISSUED, MANIFEST, TENSORS, VERSION_NAME, list_versions, version_dir
from .lock import clean_leftovers, writer_lock
from .read import load_tensors, read_manifest


def _next_version(root: Path) -> str:
    """A version name never handed out before in this store (counts past deleted ones too)."""
    issued = root / "versions" / ISSUED
    try:
        text = issued.read_text().strip() if issued.is_file() else "0"
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"{issued}: unreadable version counter ({e})") from None
    if not text.isdigit():
        raise StoreError(f"{issued}: the version counter must be a version number, got {text[:20]!r}; it was edited "
                         "(write the highest version name ever used there)")
    logged = audit.last_record(root)
    names = list_versions(root) + ([logged["version_after"]] if logged else [])
    last = max([int(text)] + [int(v) for v in names if VERSION_NAME.match(v)])
    if last >= 999999:
        raise StoreError(f"{root}: version names are used up (the last is {last:06d}, names have six digits); "
                         "copy the served model to a new store")
    version = f"{last + 1:06d}"
    atomic_write_text(issued, version + "\n")
    return version



def has_served(root: Path) -> bool:
    """Whether the store has served deletion requests: it has an audit log, its anchor or marker,
    or a version a request wrote (which outlives a deleted log)."""
    if audit.is_served(root):
        return True
    for version in list_versions(root):
        try:
            extra = read_manifest(root, version).get("extra")
        except StoreError:
            continue
        service = extra.get("service") if isinstance(extra, dict) else None
        if isinstance(service, dict) and service.get("request_id") is not None:
            return True
    return False


def set_head(path: str | os.PathLike, version: str) -> None:
    """Point ``HEAD`` at an existing version (atomically, under the writer lock).

    Raises :class:`StoreError` for a served store: there ``dkvb restore`` moves it, logged.
    """
    root = Path(path)
    with writer_lock(root):
        if has_served(root):
            raise StoreError(f"{root} serves deletion requests (it has an audit log): move HEAD with "
                             "`dkvb restore`, which logs it")
        read_manifest(root, version)  # exists and is readable
        atomic_write_text(root / "HEAD", version + "\n")


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    class_names: list[str],
    encoder: str,
    extra: dict | None = None,
    base: str | None = None,
    base_tensors: Mapping[str, Tensor] | None = None,
    update_head: bool = True,
    encoder_config: Mapping[str, Any] | None = None,
) -> str:
    """Save ``model`` as a new version of the store at ``path``; returns the version.

    Args:
        base: an existing version; tensors equal to those of the full version it rests on are
            not written again but shared (see the module docstring). ``None`` writes every tensor.
        base_tensors: tensors of that full version as the caller already loaded and verified them
            (all or some); spares reading and hashing its file again. Only tensors equal to these
            are shared.
        update_head: point ``HEAD`` at the new version (``False`` leaves ``HEAD`` alone; the caller
            moves it later).
        encoder_config: the encoder's full description (:func:`dkvb.encoders.encoder_config`: image
            size, preprocessing, weights), recorded so embeddings made otherwise are refused.

    Raises :class:`StoreLockedError` if another writer is active, and :class:`StoreError` when
    ``HEAD`` of a served store would move (see the module docstring).
    """
    if len(class_names) != model.num_classes:
        raise ValueError(f"class_names has {len(class_names)} entries, the model has {model.num_classes} classes")
    if len(set(class_names)) != len(class_names):
        raise ValueError("duplicate class names")
    root = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"refusing to save a model with NaN or inf in {bad}")
    with writer_lock(root):
        if update_head and has_served(root):
            forgotten = (audit.last_record(root) or {}).get("forgotten", [])
            raise StoreError(
                f"{root} serves deletion requests (see {audit.LOG}; forgotten now: {', '.join(forgotten) or 'none'}):"
                " saving a new model here would serve one that has not forgotten them; retrain elsewhere, or "
                "replace it with --force (dkvb.service.replace_model), which re-applies the logged forget requests "
                "to the new model")
        clean_leftovers(root)
        (root / "versions").mkdir(parents=True, exist_ok=True)
        shared = _shared_with(root, base, state, base_tensors) if base is not None else None
        own = {k: v for k, v in state.items() if shared is None or k not in shared["tensors"]}
        digests = {k: tensor_sha256(v) for k, v in own.items()}
        if shared is not None:
            digests.update(shared.pop("digests"))
        version = _next_version(root)
        tmp = root / "versions" / f".tmp-{version}-{os.getpid()}"
        try:
            tmp.mkdir()  # files go straight in: the folder becomes visible only by the rename below
            try:
                save_file(own, str(tmp / TENSORS))
            except SafetensorError as e:  # its I/O errors (a full disk, a file size limit) name no file
                raise OSError(f"{root / 'versions' / version / TENSORS}: cannot write tensors ({e})") from None
            os.chmod(tmp / TENSORS, file_mode())  # safetensors writes 0600; follow the umask like other files
            fsync_file(tmp / TENSORS)
            _write_synced(tmp / CONFIG, _json_bytes(model.config))
            manifest = {
                "format_version": FORMAT_VERSION,
                "encoder": encoder,
                "embedding_dim": model.input_dim,
                "num_classes": model.num_classes,
                "class_names": list(class_names),
                "kind": model.config["kind"],
                "sha256": {TENSORS: sha256_file(tmp / TENSORS), CONFIG: sha256_file(tmp / CONFIG)},
                "tensor_sha256": dict(sorted(digests.items())),
                "model_sha256": state_sha256(digests),
                **({"shared": shared} if shared is not None else {}),
                **({"encoder_config": dict(encoder_config)} if encoder_config else {}),
                **({"extra": extra} if extra else {}),
            }
            manifest["manifest_sha256"] = manifest_sha256(manifest)
            _write_synced(tmp / MANIFEST, _json_bytes(manifest))
            fsync_dir(tmp)
            os.replace(tmp, root / "versions" / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(root / "versions")
        if update_head:
            atomic_write_text(root / "HEAD", version + "\n")
    return version



def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _shared_with(
    root: Path, base: str, state: dict[str, Tensor], base_tensors: Mapping[str, Tensor] | None
) -> dict[str, Any]:
    """Which tensors of ``state`` equal those of the full version under ``base`` (with their digests)."""
    manifest = read_manifest(root, base)
    info = manifest.get("shared")
    full = info.get("version", base) if isinstance(info, dict) else base
    full_manifest = read_manifest(root, full) if full != base else manifest
    file_sha = full_manifest.get("sha256", {}).get(TENSORS)
    if file_sha is None:
        raise StoreError(f"{version_dir(root, full) / MANIFEST}: manifest field sha256.{TENSORS} is missing")
    if base_tensors is None:
        base_tensors, _ = load_tensors(root, full, shared=False)
    known = full_manifest.get("tensor_sha256", {})
    names, digests = [], {}
    for name, t in base_tensors.items():
        mine = state.get(name)
        if mine is not None and t.dtype == mine.dtype and t.shape == mine.shape and torch.equal(t.cpu(), mine):
            names.append(name)
            digests[name] = known.get(name) or tensor_sha256(t)
    return {"version": full, "sha256": file_sha, "tensors": sorted(names), "digests": digests}

