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

The modules: :mod:`.layout` (file and version names, ``HEAD`` and the served version),
:mod:`.digests` (tensor, model and manifest digests), :mod:`.lock` (the writer lock),
:mod:`.write` (saving a version crash-safely, sharing tensors, moving ``HEAD``), :mod:`.prune`
(deleting versions), :mod:`.erase` (zeroing erased values in kept versions) and :mod:`.read`
(loading and verifying a version). Each says how it does it.
"""
from ..errors import StoreError, StoreLockedError
from ..io import sha256_file
from .digests import manifest_sha256, model_sha256, state_sha256, tensor_sha256
from .layout import FORMAT_VERSION, current_version, list_versions, served_version
from .lock import writer_lock
from .prune import prune
from .read import check_class_names, load_model, load_tensors, read_manifest
from .write import has_served, save_model, set_head

__all__ = [
    "StoreError", "StoreLockedError", "save_model", "load_model", "load_tensors", "read_manifest", "list_versions",
    "current_version", "served_version", "set_head", "writer_lock", "model_sha256", "tensor_sha256", "state_sha256",
    "manifest_sha256", "sha256_file", "prune", "check_class_names", "has_served", "FORMAT_VERSION",
]
