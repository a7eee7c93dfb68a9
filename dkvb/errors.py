"""Errors of the model store and its audit log (a module of their own, so the low layers that raise
them, :mod:`dkvb.audit` and :mod:`dkvb.store`, need not import each other)."""
from __future__ import annotations


class StoreError(RuntimeError):
    """A stored model is missing, corrupt or does not match what the caller expects."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lock."""


class AuditError(StoreError):
    """The audit log is corrupt, cut, edited, or disagrees with its anchor or the store's versions."""


__all__ = ["StoreError", "StoreLockedError", "AuditError"]
