"""The prediction routes: embeddings as JSON rows or a ``.npy`` upload, or images; each answer
names the version that computed it (the snapshot the request started with)."""
from __future__ import annotations

import io
import json

import anyio
import numpy as np
import torch
from fastapi import APIRouter, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from .images import ImageEncoder
from .limits import Limits
from .live import LiveModel, Snapshot
from .metrics import Metrics
from .schemas import Prediction, PredictRequest


def prediction_routes(live: LiveModel, limits: Limits, metrics: Metrics,
                      predicting: anyio.CapacityLimiter) -> APIRouter:
    """``POST /predict``, ``/predict/npy`` and ``/predict/images`` over ``live``'s snapshot, at most
    ``predicting``'s number computed at once."""
    router = APIRouter(tags=["predict"])
    image_encoders: dict[str, ImageEncoder] = {}

    def predicted(snap: Snapshot, x: np.ndarray, top_k: int) -> Prediction:
        _check_rows(x, snap.embedding_dim, limits.max_rows)
        scores, ids = snap.predict(torch.from_numpy(x), top_k)
        metrics.rows.inc(len(x))
        names = snap.class_names
        best = [names[i] for i in ids[:, 0].tolist()]
        out = Prediction(version=snap.version, classes=best, scores=scores[:, 0].tolist())
        if top_k > 1:
            out.top_classes = [[names[i] for i in row] for row in ids.tolist()]
            out.top_scores = scores.tolist()
        return out

    def predict_json(raw: bytes) -> Prediction:
        snap = live.current
        try:  # pydantic's own JSON parser: several times faster than json.loads and then validating
            body = PredictRequest.model_validate_json(raw)
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from None
        if len(body.embeddings) > limits.max_rows:
            raise HTTPException(413, f"embeddings: at most {limits.max_rows} rows per request, got "
                                f"{len(body.embeddings)}")
        bad = next((i for i, row in enumerate(body.embeddings) if len(row) != snap.embedding_dim), None)
        if bad is not None:
            raise HTTPException(422, f"embeddings[{bad}]: must have {snap.embedding_dim} numbers (the model's "
                                f"embedding size), got {len(body.embeddings[bad])}")
        return predicted(snap, np.asarray(body.embeddings, dtype=np.float32), body.top_k)

    @router.post("/predict", response_model=Prediction, response_model_exclude_none=True,
                 openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": PredictRequest.model_json_schema()}}}})
    async def predict(request: Request) -> Prediction:
        """Classify embeddings (a JSON ``PredictRequest``); the response names the version that computed it."""
        return await anyio.to_thread.run_sync(predict_json, await request.body(), limiter=predicting)

    @router.post("/predict/npy", response_model=Prediction, response_model_exclude_none=True)
    async def predict_npy(file: UploadFile = File(description="a .npy array of shape (rows, embedding size)"),
                          top_k: int = 1) -> Prediction:
        """Classify embeddings uploaded as a ``.npy`` file (multipart field ``file``)."""
        if not 1 <= top_k <= 100:
            raise HTTPException(422, f"top_k: must be between 1 and 100, got {top_k}")
        return await anyio.to_thread.run_sync(predict_npy_bytes, await file.read(), top_k, limiter=predicting)

    def predict_npy_bytes(raw: bytes, top_k: int) -> Prediction:
        snap = live.current
        try:
            x = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise HTTPException(422, f"file: not a .npy array ({' '.join(str(e).split())})") from None
        if x.dtype.kind not in "fiu":
            raise HTTPException(422, f"file: must hold numbers, got dtype {x.dtype}")
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2:
            raise HTTPException(422, f"file: must be a (rows, {snap.embedding_dim}) array, got shape {x.shape}")
        return predicted(snap, np.ascontiguousarray(x, dtype=np.float32), top_k)

    @router.post("/predict/images", response_model=Prediction, response_model_exclude_none=True)
    async def predict_images(files: list[UploadFile] = File(description="image files (PNG, JPEG, ...)"),
                             top_k: int = 1) -> Prediction:
        """Classify images, embedded by the encoder the store records (built here on first use)."""
        if not 1 <= top_k <= 100:
            raise HTTPException(422, f"top_k: must be between 1 and 100, got {top_k}")
        if len(files) > limits.max_rows:
            raise HTTPException(413, f"files: at most {limits.max_rows} images per request, got {len(files)}")
        data = [await f.read() for f in files]
        return await anyio.to_thread.run_sync(predict_image_bytes, data, top_k, limiter=predicting)

    def predict_image_bytes(data: list[bytes], top_k: int) -> Prediction:
        snap = live.current
        key = json.dumps(snap.encoder_config, sort_keys=True, default=str)
        encoder = image_encoders.setdefault(key, ImageEncoder(snap.encoder_config))  # one per encoder setting
        try:
            x = encoder.encode(data)
        except (LookupError, ValueError) as e:
            raise HTTPException(422, str(e)) from None
        return predicted(snap, x.numpy(), top_k)

    return router


def _check_rows(x: np.ndarray, dim: int, max_rows: int) -> None:
    """Refuse an empty, oversized, wrongly sized or non-finite batch with one message."""
    if len(x) == 0:
        raise HTTPException(422, "embeddings: at least one row is needed")
    if len(x) > max_rows:
        raise HTTPException(413, f"embeddings: at most {max_rows} rows per request, got {len(x)}")
    if x.shape[1] != dim:
        raise HTTPException(422, f"embeddings: rows must have {dim} numbers (the model's embedding size), got "
                            f"{x.shape[1]}")
    finite = np.isfinite(x)
    if not finite.all():
        row, col = map(int, np.argwhere(~finite)[0])
        raise HTTPException(422, f"embeddings[{row}][{col}]: must be a finite number within float32's range, "
                            "got NaN or infinity")


__all__ = ["prediction_routes"]
