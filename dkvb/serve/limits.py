"""What one request may ask for, and the server's timing (:class:`Limits`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    Attributes:
        max_body_bytes: request bodies over this are refused with 413 before parsing.
        max_rows: embedding rows per prediction request.
        lock_wait_s: how long a write waits for another writer (``dkvb forget`` on the same store)
            before answering 409.
        poll_s: how often the store is checked for versions written by other processes.
        predict_threads: predictions computed at once (the rest wait their turn), so a burst of
            predictions leaves the interpreter to writes too.
    """

    max_body_bytes: int = 16 * 2**20
    max_rows: int = 1024
    lock_wait_s: float = 10.0
    poll_s: float = 0.2
    predict_threads: int = 2

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_rows", "predict_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits: {name} must be positive, got {getattr(self, name)}")
        for name in ("lock_wait_s", "poll_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits: {name} must be positive, got {getattr(self, name)}")


__all__ = ["Limits"]
