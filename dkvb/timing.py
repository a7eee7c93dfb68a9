"""Wall time per phase of a run (embed, k-means, training, and per method unlearning,
evaluation, MIA, relearning probe), so anyone sees where the time goes."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


class PhaseTimer:
    """Accumulates seconds and call counts per ``(phase, label)``; ``label`` names a model or method."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.start = time.perf_counter()

    @contextmanager
    def track(self, phase: str, label: str = "") -> Iterator[None]:
        """Time the block under ``phase`` (and ``label``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[(phase, label)] += time.perf_counter() - t0
            self.calls[(phase, label)] += 1

    def merge(self, other: "PhaseTimer") -> None:
        """Add ``other``'s seconds and calls (a worker's) to this timer's."""
        for key, seconds in other.seconds.items():
            self.seconds[key] += seconds
            self.calls[key] += other.calls[key]

    def rows(self) -> list[dict[str, object]]:
        """One row per (phase, label), in the order first seen, plus the run's total wall time."""
        out = [{"phase": p, "label": l, "seconds": s, "calls": self.calls[(p, l)]} for (p, l), s in self.seconds.items()]
        out.append({"phase": "total (wall)", "label": "", "seconds": time.perf_counter() - self.start, "calls": 1})
        return out

    def table(self) -> str:
        """Markdown table of :meth:`rows`."""
        lines = ["| phase | model / method | seconds | calls |", "|---|---|---|---|"]
        lines += [f"| {r['phase']} | {r['label']} | {r['seconds']:.2f} | {r['calls']} |" for r in self.rows()]
        return "\n".join(lines)
