"""OpenAI-compatible `POST /v1/embeddings` over the engine's dense output."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pydantic import BaseModel, ConfigDict, Field

from ..engine import Engine
from ..errors import InvalidRequest, SIEError
from .validate import check_text, validated

PATH = "/v1/embeddings"
MAX_INPUTS = 2048  # OpenAI's own limit per request


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings body (token-array inputs are not supported)."""
    model_config = ConfigDict(strict=True)
    model: str | None = Field(None, min_length=1, description="default: --embed-model")
    input: str | list[str] = Field(min_length=1, description=f"at most {MAX_INPUTS} texts")
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None
    param: str | None


class OpenAIError(BaseModel):
    error: ErrorDetail


@dataclass(frozen=True)
class EmbeddingsCall:
    model: str
    texts: list[str]
    encoding_format: str
    dimensions: int | None


def parse(body: Any) -> EmbeddingsCall:
    """An OpenAI embeddings body, validated against EmbeddingsRequest."""
    req = validated(EmbeddingsRequest, body)
    if req.model is None:
        raise InvalidRequest("model is missing")
    texts = [req.input] if isinstance(req.input, str) else req.input
    if len(texts) > MAX_INPUTS:
        raise InvalidRequest(f"input holds {len(texts)} items; at most {MAX_INPUTS}")
    for i, t in enumerate(texts):
        check_text(t, f"input[{i}]")
    return EmbeddingsCall(req.model, texts, req.encoding_format or "float", req.dimensions)


def shorten(vectors: np.ndarray, dims: int | None, model: str, engine: Engine) -> np.ndarray:
    """Cut to `dims` and re-normalise, for models whose catalog entry allows it."""
    if dims is None or dims == vectors.shape[1]:
        return vectors
    spec = engine.registry.get(model).spec
    if not spec.matryoshka:
        raise InvalidRequest(f"dimensions: {model} does not support shortened embeddings")
    if spec.matryoshka_min_dims and dims < spec.matryoshka_min_dims:
        raise InvalidRequest(f"dimensions: {model} was trained for at least "
                             f"{spec.matryoshka_min_dims} dimensions, {dims} asked for")
    if dims > vectors.shape[1]:
        raise InvalidRequest(f"dimensions: {model} has {vectors.shape[1]} dimensions, "
                             f"{dims} asked for")
    cut = vectors[:, :dims]
    return cut / np.linalg.norm(cut, axis=1, keepdims=True).clip(min=1e-12)


def response(engine: Engine, call: EmbeddingsCall, results: list) -> dict[str, Any]:
    """The OpenAI response body for the engine's results."""
    vectors = shorten(np.stack([r.dense for r in results]).astype("<f4"), call.dimensions,
                      call.model, engine)
    b64 = call.encoding_format == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.tobytes()).decode() if b64 else v.tolist()}
            for i, v in enumerate(vectors)]
    tokens = sum(r.token_count for r in results)
    return {"object": "list", "data": data, "model": call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def error_body(err: SIEError) -> dict[str, Any]:
    """OpenAI's error envelope, which its clients parse."""
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    return {"error": {"message": err.message, "type": kind, "code": err.code, "param": None}}
