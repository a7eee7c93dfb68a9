"""Request and response bodies of the HTTP API (pydantic): what FastAPI validates and documents."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Scalar = str | int | float | bool | None


class PredictRequest(BaseModel):
    """Embeddings to classify: one row per example, each as wide as the model's embedding size."""

    model_config = ConfigDict(extra="forbid")

    embeddings: list[list[float]] = Field(
        min_length=1, description="rows of encoder embeddings (finite numbers; the server's row limit applies)")
    top_k: int = Field(1, ge=1, le=100, description="also return the k best classes of each row")


class Prediction(BaseModel):
    """Predictions of one version: ``classes[i]`` and ``scores[i]`` (softmax probability) for row ``i``."""

    version: str = Field(description="the stored model version that computed them")
    classes: list[str]
    scores: list[float]
    top_classes: list[list[str]] | None = Field(None, description="the top_k classes of each row, best first")
    top_scores: list[list[float]] | None = None


class ForgetRequest(BaseModel):
    """Classes to forget, by name (a name is never read as an index), as ``dkvb forget`` takes them."""

    model_config = ConfigDict(extra="forbid")

    classes: list[str] = Field(min_length=1, max_length=1000, description="class names, taken exactly")
    method: str = Field("activations", max_length=64, description="activations or examples")
    params: dict[str, Scalar] = Field(default_factory=dict, description="method hyperparameters")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds the draw of forget examples")


class RestoreRequest(BaseModel):
    """Serve the model right after a logged request again."""

    model_config = ConfigDict(extra="forbid")

    to: str = Field(max_length=64, description="a request id from GET /log, or 'origin'")


class RecordResponse(BaseModel):
    """The audit record a request appended and the version served once it was committed."""

    version: str
    record: dict[str, Any]


class LogResponse(BaseModel):
    """The verified audit log, oldest record first."""

    version: str
    records: list[dict[str, Any]]


class VerifyResponse(BaseModel):
    """Replay of the log from the origin model against the served model's key mask."""

    version: str
    matches: bool = Field(description="the replayed key mask equals the served model's, bit for bit")
    served_matches_log: bool = Field(description="the version in memory is the one the log's last record names")
    steps: list[dict[str, Any]]
    error: str | None = Field(None, description="why the log could not be replayed (a damaged log, a differing mask)")


class Health(BaseModel):
    """What is served, and whether the store read cleanly the last time it changed."""

    status: str = Field(description="ok, or degraded while the store fails verification (the last verified "
                        "version is still served)")
    version: str
    classes: int
    forgotten: int = Field(description="how many classes are forgotten (their names: GET /log)")
    keys_masked: int
    error: str | None = None


class Problem(BaseModel):
    """An error: one line saying what was wrong."""

    detail: str


__all__ = ["PredictRequest", "Prediction", "ForgetRequest", "RestoreRequest", "RecordResponse", "LogResponse",
           "VerifyResponse", "Health", "Problem"]
