"""The model in memory that predictions read, swapped whole when the store serves another version.

A :class:`Snapshot` is immutable once installed: a prediction takes the current one (one attribute
read) and computes with it, so a request committed meanwhile never shows half-applied. Installing
goes through :meth:`LiveModel.refresh` alone, under one lock: it reads the verified audit log
(:class:`dkvb.served.ServedStore`), loads the version the log's last record names (verified) and
replaces the snapshot. A poller thread calls it when the log or ``HEAD`` changes on disk, so
versions written by other processes (``dkvb forget``) are served within one poll interval; the
server's own writes call it before answering. The version served is therefore always one the log
reaches, and never goes back to one a later logged request replaced.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..audit import ANCHOR, LOG
from ..errors import StoreError
from ..models import DKVBClassifier
from ..served import ServedStore
from ..store import current_version

log = logging.getLogger("dkvb")


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One verified version of the store, as predictions see it."""

    version: str
    model: DKVBClassifier
    class_names: tuple[str, ...]
    forgotten: tuple[str, ...]
    keys_masked: int
    log_records: int
    loaded_at: float = 0.0
    encoder_config: dict | None = None

    @property
    def embedding_dim(self) -> int:
        return self.model.input_dim

    @torch.no_grad()
    def predict(self, x: Tensor, top_k: int = 1) -> tuple[Tensor, Tensor]:
        """(probabilities, class indices) of the ``top_k`` best classes of each row, best first."""
        probs = torch.softmax(self.model(x), dim=-1)
        return probs.topk(min(top_k, probs.shape[-1]), dim=-1)


class LiveModel:
    """The snapshot the server serves for the store at ``path``, kept in line with its audit log.

    ``interval`` is the poller's period in seconds; ``on_swap(snapshot)`` is called after each
    install (metrics). :attr:`error` holds the last failure to read the store (``None`` once a
    read succeeds again); the previous snapshot stays served meanwhile.
    """

    def __init__(self, path: str | os.PathLike, *, interval: float = 0.2,
                 on_swap: Callable[[Snapshot], None] | None = None) -> None:
        self.root = Path(path)
        self.interval = interval
        self.on_swap = on_swap
        self.error: str | None = None
        self._reader = ServedStore(self.root)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: tuple | None = None
        self._current: Snapshot | None = None
        self.refresh(check=True)

    @property
    def current(self) -> Snapshot:
        """The snapshot to compute with (never ``None`` after construction)."""
        assert self._current is not None
        return self._current

    def refresh(self, *, check: bool = False) -> Snapshot:
        """Serve the version the verified log names (``HEAD``'s for a store without a log).

        ``check`` also verifies that every version a request wrote is logged
        (:meth:`ServedStore.check`), as on start-up. Raises :class:`~dkvb.errors.StoreError`
        (:class:`~dkvb.errors.AuditError` for a damaged log) and keeps the snapshot served.
        """
        with self._lock:
            seen = self._stamp()
            records = self._reader.check() if check else self._reader.log()
            version = records[-1]["version_after"] if records else self._reader_head()
            snap = self._current
            if snap is None or snap.version != version or snap.log_records != len(records):
                if snap is None or snap.version != version:
                    model, manifest = self._reader.load(version)
                    model.eval()
                    snap = Snapshot(version, model, tuple(map(str, manifest["class_names"])),
                                    tuple(ServedStore.forgotten_of(manifest)), int(model.key_mask.sum()),
                                    len(records), loaded_at=time.time(),
                                    encoder_config=manifest.get("encoder_config"))
                else:  # a logged no-op or prune: the same model, a longer log
                    snap = Snapshot(snap.version, snap.model, snap.class_names, snap.forgotten, snap.keys_masked,
                                    len(records), loaded_at=snap.loaded_at, encoder_config=snap.encoder_config)
                self._current = snap
                if self.on_swap is not None:
                    self.on_swap(snap)
            self._seen, self.error = seen, None
            return snap

    def _reader_head(self) -> str:
        head = current_version(self.root)
        if head is None:
            raise StoreError(f"{self.root}: HEAD is missing; not a dkvb model store")
        return head

    def _stamp(self) -> tuple:
        """What changes on disk when a writer commits: the log's, its anchor's and ``HEAD``'s size
        and modification time."""
        out = []
        for name in (LOG, ANCHOR, "HEAD"):
            try:
                st = os.stat(self.root / name)
                out.append((st.st_size, st.st_mtime_ns, st.st_ino))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def poll_once(self) -> bool:
        """Refresh when the store's log or ``HEAD`` changed since the last read; returns whether it
        read the store. A failure is kept in :attr:`error` and logged, not raised."""
        if self._stamp() == self._seen:
            return False
        try:
            self.refresh()
        except (StoreError, ValueError, OSError) as e:
            if self.error != str(e):
                log.error("%s: keeping version %s served: %s", self.root, self.current.version, e)
            self.error = str(e)
            self._seen = self._stamp()  # retried once something changes again
        return True

    def start(self) -> None:
        """Poll the store every :attr:`interval` seconds in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dkvb-serve-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll_once()


__all__ = ["Snapshot", "LiveModel"]
