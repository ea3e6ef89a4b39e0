"""infinity's routes (michaelfeil/infinity, as `infinity-client` 0.0.78 sends and parses them):
`POST /embeddings` (OpenAI's shape plus infinity's `model: "default/not-specified"`,
`dimensions: 0` = full size, `modality: "text"`), `POST /rerank` (`{query, documents: [str],
top_n, return_documents, raw_scores, model}` -> `{object, results: [{relevance_score, index,
document: str}], model, usage, id, created}`) and `GET /models`.

infinity serves these under an optional `--url-prefix`; here they are served at the root and,
with `--infinity-prefix PREFIX`, also under PREFIX. `POST /rerank` is TEI's route too: a body
with `texts` is TEI's (api/tei.py), one with `documents` infinity's.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import InvalidRequest
from ..models import FAMILIES
from . import openai
from .calls import Calls
from .models import STARTED
from .rerank import texts_of
from .tei import Timer
from .validate import validated

DEFAULT = "default/not-specified"  # infinity-client's model when none is given


class InfinityEmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input: str | list[str] = Field(min_length=1)
    model: str = DEFAULT
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None
    dimensions: int = Field(0, ge=0, description="0: the model's full size")
    modality: Literal["text"] = "text"


class InfinityRerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    query: str
    documents: list[str] = Field(min_length=1)
    return_documents: bool = False
    raw_scores: bool = False
    model: str = DEFAULT
    top_n: int | None = Field(None, ge=1)


class InfinityUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class InfinityRerankObject(BaseModel):
    relevance_score: float
    index: int
    document: str | None = None


class InfinityRerankResponse(BaseModel):
    object: Literal["rerank"]
    results: list[InfinityRerankObject]
    model: str
    usage: InfinityUsage
    id: str
    created: int


class InfinityModel(BaseModel):
    id: str
    object: Literal["model"]
    owned_by: Literal["infinity"]  # infinity-client's enum has only this value
    created: int
    backend: str
    capabilities: list[str]
    stats: dict[str, Any] = Field(description="infinity's queue statistics; {} here")


class InfinityModels(BaseModel):
    data: list[InfinityModel]
    object: Literal["list"]


class Infinity:
    """infinity's routes over `calls`."""

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def _model(self, name: str, role: str) -> str:
        return self.calls.model_or_default(None if name == DEFAULT else name, role)

    async def embeddings(self, request: Request) -> Response:
        """infinity's (and TEI's) /embeddings: TEI's timing headers come along."""
        timer = Timer(request, self.calls.engine)
        req = validated(InfinityEmbeddingsRequest, await self.calls.json(request))
        call = openai.parse({"model": self._model(req.model, "embed"), "input": req.input,
                             "encoding_format": req.encoding_format,
                             "dimensions": req.dimensions or None})
        results = await self.calls.encode(request, call.model, call.texts, ["dense"], {})
        payload = openai.response(self.calls.engine, call, results)
        return JSONResponse({**payload, "id": f"infinity-{uuid.uuid4()}",
                             "created": int(time.time())},
                            headers=timer.headers(call.texts, payload["usage"]["prompt_tokens"]))

    async def rerank(self, request: Request, body: Any = None) -> Response:
        req = validated(InfinityRerankRequest,
                        await self.calls.json(request) if body is None else body)
        texts = texts_of(req.documents)
        model = self._model(req.model, "rerank")
        options: dict[str, Any] = {}
        if FAMILIES[self.calls.engine.registry.handle(model).spec.family].pair_scoring:
            options["activation"] = "none" if req.raw_scores else "sigmoid"
        elif req.raw_scores:
            raise InvalidRequest(f"raw_scores: {model} scores by similarity; it has no raw "
                                 "logits")
        result = await self.calls.score(request, model, req.query, texts, options, req.top_n)
        results = [{"relevance_score": float(result.scores[i]), "index": int(i),
                    "document": texts[i] if req.return_documents else None}
                   for i in result.order.tolist()]
        tokens = result.input_tokens
        return JSONResponse({"object": "rerank", "results": results, "model": model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                             "id": f"infinity-{uuid.uuid4()}", "created": int(time.time())})

    async def models(self, request: Request) -> Response:
        data = []
        for h in self.calls.engine.registry.handles():
            family = FAMILIES[h.spec.family]
            caps = (["embed"] if "dense" in family.output_types else []) + \
                (["rerank"] if family.score_types else [])
            data.append({"id": h.spec.name, "object": "model", "owned_by": "infinity",
                         "created": STARTED, "backend": "torch", "capabilities": caps,
                         "stats": {}})
        return JSONResponse({"data": data, "object": "list"})
