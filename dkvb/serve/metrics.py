"""Prometheus metrics of one app (its own registry): request counts and latencies per endpoint,
and what is served.

Endpoints are labelled by their route template (``/predict``), never by the raw path, so unknown
paths count under ``other`` and the label set stays small.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .live import Snapshot

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The collectors of one app, registered in their own :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dkvb_http_requests", "HTTP requests by endpoint, method and status code",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("dkvb_http_request_seconds", "Time to answer an HTTP request, by endpoint",
                                 ["endpoint"], buckets=BUCKETS, registry=r)
        self.rows = Counter("dkvb_predicted_rows", "Embedding rows classified", registry=r)
        self.version = Gauge("dkvb_served_version", "The stored model version served (its number)", registry=r)
        self.keys_masked = Gauge("dkvb_keys_masked", "Keys masked in the served model", registry=r)
        self.forgotten = Gauge("dkvb_classes_forgotten", "Classes forgotten in the served model", registry=r)
        self.log_records = Gauge("dkvb_audit_log_records", "Records in the verified audit log", registry=r)
        self.swaps = Counter("dkvb_model_swaps", "Times the served model was replaced by another version",
                             registry=r)
        self.store_error = Gauge("dkvb_store_error", "1 while the store fails verification (the last verified "
                                 "version stays served)", registry=r)

    def served(self, snap: Snapshot) -> None:
        """Record a newly installed snapshot."""
        self.version.set(int(snap.version) if snap.version.isdigit() else -1)
        self.keys_masked.set(snap.keys_masked)
        self.forgotten.set(len(snap.forgotten))
        self.log_records.set(snap.log_records)
        self.swaps.inc()

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def text(self) -> bytes:
        """The Prometheus text exposition of every collector."""
        return generate_latest(self.registry)


__all__ = ["Metrics", "BUCKETS"]
