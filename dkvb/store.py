"""Model store: a saved classifier is a folder of immutable versions and a ``HEAD`` pointer.

Layout::

    model/
      HEAD                    # name of the current version, replaced atomically
      .lock                   # advisory writer lock (flock); held while a writer changes the store
      audit.jsonl             # forget/restore requests, when served by dkvb.service (see dkvb.audit)
      audit.anchor.json       # length and last-line digest of audit.jsonl
      versions/000001/
        config.json           # what rebuilds the module (kind, sizes, seed, ...)
        tensors.safetensors   # keys, projection, values, decoder, key mask, activation counts
        manifest.json         # format version, encoder, embedding dim, class names, sha256 of files
                              # and of every tensor, model digest, shared tensors, extra, and the
                              # sha256 of the manifest itself (manifest_sha256)
      versions/000002/        # a shared version: tensors.safetensors holds only the key mask
      versions/.issued        # the last version name handed out: names are never reused

Writes. A save writes a new version folder completely (files fsynced) under a temporary name,
renames it into place and only then replaces ``HEAD``, so killing the writer at any point leaves
either the old or the new model; leftovers of a killed writer (``versions/.tmp-*``, ``.HEAD.*.tmp``)
are removed by the next save. Version names count up and are never reused, even after the newest
versions were deleted (``versions/.issued`` remembers the last one). Every writer holds ``.lock`` (``filelock``, i.e. ``flock``): a second
concurrent writer fails at once with :class:`StoreLockedError` instead of interleaving. The kernel
drops the lock when its holder dies, so a killed writer never leaves a stale lock.

Shared tensors. ``save_model(..., base=VERSION)`` writes only the tensors that differ from the
full version ``VERSION`` rests on (for a masking unlearner: the key mask); the manifest's ``shared``
field names that version, the sha256 of its tensors file and the tensors taken from it. A shared
version is one level deep (its base is always a full version); loading verifies both files.
:func:`prune` deletes versions but never the base of one it keeps.

Served stores. A store with an audit log (:mod:`dkvb.audit`) serves the version its last record
names: readers that ask for the current model (``version=None``) get that version even when a
writer was killed before moving ``HEAD`` or ``HEAD`` is missing or corrupt, and :func:`save_model`
refuses to move ``HEAD`` of such a store (a retrained model would serve classes the log says are
forgotten) unless ``force=True``, which logs the new model as an ``origin`` record.

Reads. Loading verifies the manifest and the checksums and names the field that does not match.
Readers take no lock: versions are immutable and ``HEAD`` is replaced atomically. A caller that
loads many versions passes a ``cache`` dict so each full version is read and hashed once.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import filelock
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import audit
from .errors import StoreError, StoreLockedError
from .io import atomic_write_text, file_mode, fsync_dir, fsync_file, sha256_file
from .models import build_model

FORMAT_VERSION = 3  # what this dkvb writes; 2 adds per-tensor digests and shared tensors, 3 manifest_sha256
READABLE_FORMATS = (1, 2, 3)
TENSORS, CONFIG, MANIFEST, LOCK, ISSUED = (
    "tensors.safetensors", "config.json", "manifest.json", ".lock", ".issued")
_VERSION_NAME = re.compile(r"^\d{6}$")


# ------------------------------------------------------------------ digests
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


# ------------------------------------------------------------------ lock
_HELD: dict[tuple[str, int], list] = {}  # (store, thread) -> [FileLock, depth]


@contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the store's writer lock; re-entrant within one thread, fails at once elsewhere.

    Raises :class:`StoreLockedError` when another process (or thread) is writing to the store.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    key = (str(root.resolve()), threading.get_ident())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    lock = filelock.FileLock(str(root / LOCK), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise StoreLockedError(
            f"{root}: another writer holds the store lock ({root / LOCK}); wait for it to finish and retry"
        ) from None
    _HELD[key] = [lock, 1]
    try:
        yield
    finally:
        del _HELD[key]
        lock.release()


def _clean_leftovers(root: Path) -> None:
    """Remove what killed writers left behind (called with the lock held, so no writer is active)."""
    versions = root / "versions"
    if versions.is_dir():
        for p in versions.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in versions.glob(".*.tmp"):
            p.unlink(missing_ok=True)
    for p in root.glob(".*.tmp"):
        p.unlink(missing_ok=True)


# ------------------------------------------------------------------ versions
def current_version(path: str | os.PathLike) -> str | None:
    """The version ``HEAD`` points to, or ``None`` for an empty/new store."""
    head = Path(path) / "HEAD"
    return head.read_bytes().decode("utf-8", errors="replace").strip() if head.is_file() else None


def served_version(path: str | os.PathLike) -> str | None:
    """The version the store serves: the last audit record's ``version_after`` for a served store
    (the log is the commit point, see :mod:`dkvb.audit`), else ``HEAD``'s."""
    last = audit.last_record(path)
    return last["version_after"] if last is not None else current_version(path)


def _next_version(root: Path) -> str:
    """A version name never handed out before in this store (counts past deleted ones too)."""
    issued = root / "versions" / ISSUED
    try:
        last = int(issued.read_text().strip()) if issued.is_file() else 0
    except (OSError, ValueError):
        last = 0
    logged = audit.last_record(root)
    names = list_versions(root) + ([logged["version_after"]] if logged else [])
    last = max([last] + [int(v) for v in names if _VERSION_NAME.match(v)])
    version = f"{last + 1:06d}"
    atomic_write_text(issued, version + "\n")
    return version


def list_versions(path: str | os.PathLike) -> list[str]:
    root = Path(path) / "versions"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _VERSION_NAME.match(p.name)) if root.is_dir() else []


def set_head(path: str | os.PathLike, version: str) -> None:
    """Point ``HEAD`` at an existing version (atomically, under the writer lock).

    Raises :class:`StoreError` for a served store: there ``dkvb restore`` moves it, logged.
    """
    root = Path(path)
    with writer_lock(root):
        if audit.is_served(root):
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
    force: bool = False,
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
        force: move ``HEAD`` of a served store too, logging the new model as an ``origin`` record
            whose ``forgotten`` list is empty (the classes forgotten before are not forgotten in it).

    Raises :class:`StoreLockedError` if another writer is active, and :class:`StoreError` when
    ``HEAD`` of a served store would move without ``force``.
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
        log = audit.AuditLog(root, audit.audit_key()) if update_head and audit.is_served(root) else None
        if log is not None:
            records = log.sync()
            if not force:
                forgotten = records[-1].get("forgotten", []) if records else []
                raise StoreError(
                    f"{root} serves deletion requests (see {audit.LOG}; forgotten now: {', '.join(forgotten) or 'none'}):"
                    " saving a new model would serve one that has not forgotten them; retrain elsewhere, or pass "
                    "force (--force) to replace it and log that nothing is forgotten in the new model")
        _clean_leftovers(root)
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
        if log is not None:
            mask = state.get("bottleneck.key_mask")
            log.append({"op": "origin", "version": version, "version_after": version,
                        "note": "model replaced outside the service (save_model force=True); nothing is forgotten in it",
                        "model_sha256": manifest["model_sha256"], "forgotten": [],
                        "mask_sha256": tensor_sha256(mask.bool()) if mask is not None else None})
        if update_head:
            atomic_write_text(root / "HEAD", version + "\n")
    return version


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """Digest of a manifest's fields other than ``manifest_sha256`` (class names and extra included)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def prune(path: str | os.PathLike, keep: Iterable[str] = (), *, dry_run: bool = False) -> list[str]:
    """Delete every version but the served one, ``HEAD``'s, those in ``keep`` and the full versions
    any of them shares tensors with; returns the deleted names (``dry_run``: those it would delete).

    Each version is first renamed out of sight, then removed, so a killed prune leaves no
    half-deleted version. Raises :class:`StoreError` where a kept version's manifest is unreadable
    (its base would be unknown).
    """
    root = Path(path)
    with writer_lock(root):
        _clean_leftovers(root)
        existing = list_versions(root)
        wanted = {v for v in (served_version(root), current_version(root), *keep) if v in existing}
        if not wanted:
            raise StoreError(f"no stored model at {root}: nothing to keep, refusing to delete every version")
        needed = set(wanted)
        for v in wanted:
            info = read_manifest(root, v).get("shared")
            if isinstance(info, dict):
                needed.add(str(info.get("version")))
        doomed = [v for v in existing if v not in needed]
        if not dry_run:
            for v in doomed:
                gone = root / "versions" / f".tmp-pruned-{v}"
                os.replace(root / "versions" / v, gone)
                shutil.rmtree(gone)
            fsync_dir(root / "versions")
    return doomed


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
        raise StoreError(f"{_version_dir(root, full) / MANIFEST}: manifest field sha256.{TENSORS} is missing")
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


# ------------------------------------------------------------------ reading
def read_manifest(path: str | os.PathLike, version: str | None = None) -> dict[str, Any]:
    """The manifest of ``version`` (default: ``HEAD``) without loading tensors."""
    vdir = _version_dir(Path(path), version)
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
    cache: dict[str, tuple[str, dict[str, Tensor]]] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Verified tensors of a version and its manifest.

    Args:
        shared: also return the tensors the version shares with its full version (``False``
            reads only its own file).
        cache: ``{full version: (sha256 of its tensors file, tensors)}`` of full versions already
            verified in this process; consulted before hashing a base file again and filled after.
            Versions are immutable, so a long-lived caller (:class:`dkvb.service.ModelService`)
            verifies each full version once; the version's own file is always verified.
    """
    root = Path(path)
    vdir = _version_dir(root, version)
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
    if cache is not None and info is None and cache.get(vdir.name, ("",))[0] == sums[TENSORS]:
        state = dict(cache[vdir.name][1])
        for name, digest in sums.items():
            if name != TENSORS:
                _check_file(vdir / name, digest, f"sha256.{name}")
        return state, manifest
    for name, digest in sums.items():
        _check_file(vdir / name, digest, f"sha256.{name}")
    state = _read_tensors(vdir / TENSORS)
    if cache is not None and info is None:
        cache[vdir.name] = (sums[TENSORS], dict(state))
    if shared and info is not None:
        try:
            full, digest, names = info["version"], info["sha256"], list(info["tensors"])
        except (KeyError, TypeError) as e:
            raise StoreError(f"{vdir / MANIFEST}: manifest field shared is malformed ({e!r})") from e
        if not isinstance(full, str) or not _VERSION_NAME.match(full) or full == vdir.name:
            raise StoreError(f"{vdir / MANIFEST}: manifest field shared.version is {full!r}, not another version")
        fdir = _version_dir(root, full)
        if cache is not None and cache.get(full, ("",))[0] == digest:
            base = cache[full][1]
        else:
            _check_file(fdir / TENSORS, digest, f"shared.sha256 of {vdir / MANIFEST}")
            base = _read_tensors(fdir / TENSORS)
            if cache is not None:
                cache[full] = (digest, base)
        missing = [n for n in names if n not in base]
        if missing:
            raise StoreError(f"{fdir / TENSORS}: lacks shared tensor(s) {missing} (manifest field shared.tensors)")
        state = {**{n: base[n] for n in names}, **state}
    return state, manifest


def load_model(
    path: str | os.PathLike,
    version: str | None = None,
    *,
    expect_encoder: str | None = None,
    expect_dim: int | None = None,
    cache: dict[str, tuple[str, dict[str, Tensor]]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load and verify a stored model; returns ``(model, manifest)``.

    ``cache`` is passed to :func:`load_tensors`. Raises :class:`StoreError` naming the field for a
    wrong format version, a checksum mismatch, an encoder or embedding size other than expected,
    a config that disagrees with the manifest, or unreadable tensors.
    """
    root = Path(path)
    vdir = _version_dir(root, version)
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
    if manifest["format_version"] >= 3 and manifest.get("manifest_sha256") != manifest_sha256(manifest):
        raise StoreError(f"{vdir / MANIFEST}: manifest field manifest_sha256 does not match the manifest; "
                         "it was edited (class names, extra, ...)")
    model.eval()
    return model, manifest


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


def _version_dir(root: Path, version: str | None) -> Path:
    if not root.is_dir():
        raise StoreError(f"no stored model at {root}")
    version = version or served_version(root)
    if version is None:
        raise StoreError(f"{root}: HEAD is missing; not a dkvb model store")
    if not _VERSION_NAME.match(version):
        raise StoreError(f"{root}: {version!r} is not a version name (six digits); HEAD or the request is corrupt")
    vdir = root / "versions" / version
    if not vdir.is_dir():
        raise StoreError(f"{root}: version {version} does not exist (have {list_versions(root)})")
    return vdir


__all__ = [
    "StoreError", "StoreLockedError", "save_model", "load_model", "load_tensors", "read_manifest", "list_versions",
    "current_version", "served_version", "set_head", "writer_lock", "model_sha256", "tensor_sha256", "state_sha256",
    "manifest_sha256", "sha256_file", "prune", "FORMAT_VERSION",
]
