"""Rerank APIs over the engine's scoring (the path of /v1/score): one `POST /v1/rerank` that
SIE's local route, Cohere's v1 and Jina's clients each send and parse, and Cohere's
`POST /v2/rerank`.

Request: `{model, query, documents, top_n?, return_documents?, max_tokens_per_doc?, options?}`;
documents are strings or `{"text": ...}` objects (Cohere v1, Jina). `options` are SIE's
/v1/score options, passed to the engine unchanged, so `/v1/rerank` ranks exactly as
`/v1/score` does for the same model and options. `model` names a served model; without one
(Cohere v1 allows that) the `--rerank-model` default is used.

Response (v1): `{id, object: "rerank", model, results: [{index, relevance_score,
document?: {text}}], usage: {input_tokens, prompt_tokens, total_tokens}, meta}`, best first:
SIE's fields (`model`, `results`, `usage.input_tokens`), Cohere's (`id`, `meta`) and Jina's
(`usage.total_tokens`) at once. v2 is Cohere's v2 (no documents returned).
Errors: v1 in SIE's OpenAI-style envelope `{"error": {message, type, code, param}}` plus
Cohere's top-level `message`; v2 Cohere's `{"message"}`.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine.scoring import ScoreResult
from ..errors import InvalidRequest, SIEError
from . import openai
from .calls import Calls
from .validate import check_text, validated


class DocumentObject(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # Cohere v1 documents: more fields
    text: str


class RerankBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(None, description="a served model; default --rerank-model")
    query: str
    top_n: int | None = Field(None, ge=1)
    max_tokens_per_doc: int | None = Field(
        None, ge=1, description="accepted when at least the model's own limit (documents "
        "are cut there); a smaller value is refused")


class RerankRequest(RerankBase):
    """SIE's /v1/rerank, Cohere's v1 and Jina's body."""
    documents: list[str | DocumentObject]
    return_documents: bool = False
    rank_fields: list[str] | None = Field(None, description="Cohere v1: only ['text']")
    max_chunks_per_doc: int | None = Field(None, description="Cohere v1: ignored")
    options: dict[str, Any] | None = Field(None, description="SIE's /v1/score options")


class RerankV2Request(RerankBase):
    """Cohere's /v2/rerank body."""
    model: str
    documents: list[str]
    relevant_spans: Any = Field(None, description="not supported: null only")


class ResultDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: ResultDocument | None = None


class RerankUsage(BaseModel):
    input_tokens: int
    prompt_tokens: int
    total_tokens: int


class BilledUnits(BaseModel):
    search_units: int


class ApiVersion(BaseModel):
    version: str


class Meta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits


class RerankResponse(BaseModel):
    id: str
    object: str = "rerank"
    model: str
    results: list[RerankResult]
    usage: RerankUsage
    meta: Meta


class CohereError(BaseModel):
    message: str


class RerankError(BaseModel):
    message: str
    error: openai.ErrorDetail


def texts_of(documents: list) -> list[str]:
    out = []
    for i, d in enumerate(documents):
        text = d if isinstance(d, str) else d.text
        check_text(text, f"documents[{i}]")
        out.append(text)
    if not out:
        raise InvalidRequest("documents: must hold at least one document")
    return out


def ranked(result: ScoreResult, texts: list[str], return_documents: bool) -> list[dict]:
    """Results best first (the engine's order, cut to top_n)."""
    return [{"index": int(i), "relevance_score": float(result.scores[i]),
             **({"document": {"text": texts[i]}} if return_documents else {})}
            for i in result.order.tolist()]


def response(model: str, results: list[dict], tokens: int, version: str) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "object": "rerank", "model": model, "results": results,
            "usage": {"input_tokens": tokens, "prompt_tokens": tokens, "total_tokens": tokens},
            "meta": {"api_version": {"version": version}, "billed_units": {"search_units": 1}}}


def error_v1(err: SIEError) -> dict[str, Any]:
    """Cohere v1's error body (`message`), with OpenAI's `error` that Jina's clients read."""
    return {"message": err.message, **openai.error_body(err)}


def error_v2(err: SIEError) -> dict[str, Any]:
    """Cohere v2's error body."""
    return {"message": err.message}


class Rerank:
    """The rerank routes over `calls`."""

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def _score(self, request: Request, req: RerankBase, texts: list[str],
                     options: dict[str, Any]) -> tuple[str, ScoreResult]:
        check_text(req.query, "query")
        model = self.calls.model_or_default(req.model, "rerank")
        if req.max_tokens_per_doc is not None:
            info = self.calls.engine.registry.describe(self.calls.engine.registry.handle(model))
            limit = info.max_input_tokens if info else None
            if limit is None or req.max_tokens_per_doc < limit:
                raise InvalidRequest(f"max_tokens_per_doc: {model} reads documents up to its "
                                     f"own limit ({limit} tokens); a smaller cut is not "
                                     "supported")
        result = await self.calls.score(request, model, req.query, texts, options, req.top_n)
        return model, result

    async def v1(self, request: Request) -> Response:
        req = validated(RerankRequest, await self.calls.json(request))
        if req.rank_fields not in (None, ["text"]):
            raise InvalidRequest("rank_fields: only ['text'] is supported")
        texts = texts_of(req.documents)
        model, result = await self._score(request, req, texts, dict(req.options or {}))
        return JSONResponse(response(model, ranked(result, texts, req.return_documents),
                                     result.input_tokens, "1"))

    async def v2(self, request: Request) -> Response:
        req = validated(RerankV2Request, await self.calls.json(request))
        if req.relevant_spans is not None:
            raise InvalidRequest("relevant_spans: not supported by this server")
        texts = texts_of(req.documents)
        model, result = await self._score(request, req, texts, {})
        return JSONResponse(response(model, ranked(result, texts, False),
                                     result.input_tokens, "2"))
