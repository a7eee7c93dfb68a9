"""The HTTP API over a model store: :func:`create_app` builds the FastAPI app.

Predictions read the in-memory snapshot (:mod:`.live`); forget and restore go through
:class:`dkvb.service.ModelService` under the store's writer lock, one at a time, and install the
committed version before they answer. Every error is one JSON line ``{"detail": "..."}`` with a
4xx status; paths of the store never appear in it.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data import EmbeddingSet
from ..value_init import keep_ridge_system
from ..errors import AuditError, StoreError, StoreLockedError
from ..replay import ReplayError
from ..request import make_request
from ..service import ModelService
from ..served import ServedStore
from ..store import current_version
from ..unlearn import create_unlearner
from .auth import token_matches
from .guard import Guard
from .limits import Limits
from .live import LiveModel, Snapshot
from .metrics import Metrics
from .predict import prediction_routes
from .schemas import (
    ForgetRequest, Health, LogResponse, Problem, RecordResponse, RestoreRequest, VerifyResponse,
)

log = logging.getLogger("dkvb")


ERRORS = {code: {"model": Problem} for code in (400, 401, 404, 409, 413, 422, 503)}


def create_app(store_path: str | os.PathLike, *, token: str | None = None, limits: Limits = Limits(),
               data: EmbeddingSet | None = None) -> FastAPI:
    """The API over the store at ``store_path``.

    Args:
        token: the bearer token that ``/forget``, ``/restore``, ``/log`` and ``/verify`` require
            (``None``: open to every caller; see :func:`dkvb.serve.auth.check_bind`).
        limits: body, batch and timing limits (:class:`Limits`).
        data: training embeddings for methods that read them (``examples``) and for replay.

    The store is verified and its served version loaded here: a damaged store raises
    :class:`~dkvb.errors.StoreError` before anything is served.
    """
    root = Path(store_path)
    metrics = Metrics()
    live = LiveModel(root, interval=limits.poll_s, on_swap=metrics.served)
    writer = Writer(root, live, limits.lock_wait_s)
    warm_up(live.current, data)
    predicting = anyio.CapacityLimiter(limits.predict_threads)
    public = _Public(root)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        live.start()
        try:
            yield
        finally:
            live.stop()

    app = FastAPI(title="dkvb", version="1", lifespan=lifespan, responses=ERRORS,
                  description="Predictions and class deletion requests over a dkvb model store. Every prediction "
                  "and record names the stored version that computed it.")
    app.add_middleware(Guard, metrics=metrics, max_body=limits.max_body_bytes)
    app.state.live, app.state.metrics = live, metrics
    bearer = HTTPBearer(auto_error=False, description="the server's token (--token-file or DKVB_SERVE_TOKEN)")

    def authorized(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        if creds is None:
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not token_matches(creds.credentials, token):
            raise HTTPException(401, "wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    app.include_router(prediction_routes(live, limits, metrics, predicting))

    @app.post("/forget", response_model=RecordResponse, dependencies=[Depends(authorized)], tags=["requests"])
    def forget(body: ForgetRequest) -> RecordResponse:
        """Forget classes (by name) from the served model; returns the logged audit record."""
        return writer.run(lambda svc: svc.forget(body.classes, body.method, dict(body.params), data=data,
                                                 seed=body.seed, metrics=False))

    @app.post("/restore", response_model=RecordResponse, dependencies=[Depends(authorized)], tags=["requests"])
    def restore(body: RestoreRequest) -> RecordResponse:
        """Serve the model right after a logged request (or the origin) again; logged like a request."""
        return writer.run(lambda svc: svc.restore(body.to))

    @app.get("/log", response_model=LogResponse, dependencies=[Depends(authorized)], tags=["audit"])
    def audit_log() -> LogResponse:
        """The verified audit log (chain, anchor and, with the key set, every mac checked)."""
        return LogResponse(version=live.current.version, records=ServedStore(root).log())

    @app.get("/verify", response_model=VerifyResponse, dependencies=[Depends(authorized)], tags=["audit"])
    def verify() -> VerifyResponse:
        """Replay the log from the origin model and compare with the served key mask, bit for bit."""
        snap, reader = live.current, ServedStore(root)
        try:
            records = reader.check()
            if not records:  # nothing logged: the served model is HEAD's, unchanged by any request
                return VerifyResponse(version=snap.version, matches=True, steps=[],
                                      served_matches_log=snap.version == current_version(root))
            result = reader.replay(data)
        except (ReplayError, StoreError) as e:
            return VerifyResponse(version=snap.version, matches=False, served_matches_log=False, steps=[],
                                  error=public(e))
        logged = reader.log()[-1]["version_after"]
        return VerifyResponse(version=snap.version, matches=result.matches_head,
                              served_matches_log=logged == snap.version and torch.equal(result.mask,
                                                                                         snap.model.key_mask),
                              steps=result.steps)

    @app.get("/health", response_model=Health, tags=["status"])
    def health() -> Response:
        """What is served; 503 while the store fails verification (the last verified version stays served)."""
        snap = live.current
        body = Health(status="degraded" if live.error else "ok", version=snap.version, classes=len(snap.class_names),
                      forgotten=len(snap.forgotten), keys_masked=snap.keys_masked,
                      error=public(live.error) if live.error else None)
        metrics.store_error.set(1 if live.error else 0)
        return JSONResponse(body.model_dump(), status_code=503 if live.error else 200)

    @app.get("/metrics", tags=["status"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
    def prometheus() -> Response:
        """Request counts and latency histograms per endpoint, the served version, keys masked and
        classes forgotten (Prometheus text format)."""
        metrics.store_error.set(1 if live.error else 0)
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    _error_handlers(app, public)
    return app


class Writer:
    """Requests that write to the store, one at a time in this process, each waiting up to
    ``lock_wait`` seconds for a writer in another process; the committed version is installed in
    ``live`` before the answer."""

    def __init__(self, root: Path, live: LiveModel, lock_wait: float) -> None:
        self.service = ModelService(root)
        self.live, self.lock_wait = live, lock_wait
        self.public = _Public(root)
        self._lock = threading.Lock()

    def run(self, request: Callable[[ModelService], dict[str, Any]]) -> RecordResponse:
        deadline = time.monotonic() + self.lock_wait
        with self._lock:
            while True:
                try:
                    record = request(self.service)
                    break
                except StoreLockedError as e:
                    if time.monotonic() >= deadline:
                        raise HTTPException(409, self.public(e)) from None
                    time.sleep(0.01)
                except AuditError as e:
                    raise HTTPException(503, f"the store fails verification: {self.public(e)}") from None
                except (ValueError, TypeError) as e:
                    raise HTTPException(422, self.public(e)) from None
                except StoreError as e:
                    raise HTTPException(503, self.public(e)) from None
            snap = self.live.refresh()
        return RecordResponse(version=snap.version, record=record)


def warm_up(snap: Snapshot, data: EmbeddingSet | None = None) -> None:
    """Load the compiled kernels a first request would (numba's cache: about half a second): one
    prediction, and one forget on an in-memory copy of the model; nothing is written. A ridge-valued
    model's system is made from ``data`` (its training embeddings) and kept for the requests."""
    snap.predict(torch.zeros(1, snap.embedding_dim))
    if data is not None:
        keep_ridge_system(snap.model, data)
    unlearner = create_unlearner("dkvb-activations")
    model = copy.deepcopy(snap.model)
    try:
        request, _ = make_request(unlearner, model, [0], None, 0)
    except ValueError:  # the model has no cached counts: a forget reads embeddings, nothing to load ahead
        return
    unlearner.unlearn(model, request)


class _Public:
    """An error message with the store's path replaced by ``<store>`` (callers see no server paths)."""

    def __init__(self, root: Path) -> None:
        self.paths = sorted({str(root), str(root.resolve()), os.path.abspath(root)}, key=len, reverse=True)

    def __call__(self, error: BaseException | str) -> str:
        text = " ".join(str(error).split())
        for p in self.paths:
            text = text.replace(p, "<store>")
        return text


def _error_handlers(app: FastAPI, public: _Public) -> None:
    """One JSON line ``{"detail": ...}`` for every error; a traceback only in the server's log."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ())]
        if first.get("type") == "json_invalid":
            where = first.get("ctx", {}).get("error", first.get("msg", ""))
            detail = f"malformed JSON body: {where}" + (f" (at character {loc[1]})" if len(loc) > 1 else "")
        elif loc in (["body"], []):
            detail = "body: must be a JSON object (Content-Type: application/json), see /docs"
        else:
            loc = [str(p) for p in first.get("loc", ()) if p != "body"]
            path = loc[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:]) if loc else "body"
            detail = f"{path}: {first.get('msg', 'invalid')}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1
                                                                 else "")
        return JSONResponse({"detail": " ".join(detail.split())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse({"detail": public(detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("dkvb serve: %s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; the server's log has the details"}, status_code=500)


__all__ = ["create_app", "Limits", "Writer"]
