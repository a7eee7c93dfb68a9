"""HTTP serving of a model store: predictions from an in-memory model that follows the audit log,
and forget/restore requests through :class:`dkvb.service.ModelService`.

The package: :mod:`.schemas` (request and response bodies), :mod:`.live` (the served snapshot and
the poller that swaps it), :mod:`.auth` (the bearer token), :mod:`.metrics` (Prometheus),
:mod:`.guard` (body limit and per-endpoint metrics middleware), :mod:`.limits` (what a request
may ask for), :mod:`.predict` (the prediction routes), :mod:`.images` (the store's encoder for
image requests), :mod:`.app` (:func:`create_app`: the write, audit and status routes) and
:mod:`.server` (running it on uvicorn). Needs the ``serve`` extra (FastAPI, uvicorn,
prometheus-client, python-multipart).
"""
from .app import create_app
from .auth import TOKEN_ENV, check_bind, load_token
from .limits import Limits
from .live import LiveModel, Snapshot
from .server import serve

__all__ = ["create_app", "Limits", "serve", "load_token", "check_bind", "TOKEN_ENV", "LiveModel", "Snapshot"]
