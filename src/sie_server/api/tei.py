"""text-embeddings-inference (TEI)'s HTTP API over the engine, as TEI defines it
(router/src/http/types.rs and server.rs of huggingface/text-embeddings-inference).

TEI serves one model per process; here its routes use the model named by the request's
`model` field when a client sends one, else `--embed-model` (embed, similarity, tokenize) or
`--rerank-model` (rerank, predict) (api/calls.py `default_model`). `POST /` answers as TEI's
does for the embedding model (embed; embed_sparse for a sparse-only model), and also takes a
sentence-similarity body (`inputs.source_sentence`), which is what huggingface_hub's
InferenceClient sends there. Errors are TEI's `{error, error_type}` with TEI's statuses;
answers that compute carry TEI's timing headers (`Timer`).

Not served (422 naming the field): token-id inputs and `truncation_direction: left`.
`normalize: false` gives the pooled vectors before the model's own L2 step (CLIP and SigLIP
vectors are normalised regardless).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, RootModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..engine import Engine
from ..errors import InvalidRequest, SIEError
from ..models import FAMILIES
from .calls import Calls
from .openapi import Operation
from .openai import shorten
from .validate import check_text, validated

Inputs = str | list[str]
LABEL = "LABEL_0"  # a one-logit cross-encoder's only label (transformers' default id2label)


class TEIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # TEI ignores unknown fields
    model: str | None = Field(None, description="this server's addition: the model to use "
                              "(default: --embed-model / --rerank-model)", strict=True)


class Truncating(TEIRequest):
    truncate: bool | None = Field(None, description="cut inputs at the model's limit "
                                  "(default true here; else too long an input is a 413)")
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"


class EmbedRequest(Truncating):
    inputs: Inputs
    prompt_name: str | None = Field(None, description="'query' or 'document'/'passage': the "
                                    "model's query or document prefix")
    normalize: bool = True
    dimensions: int | None = Field(None, ge=1)


class EmbedSparseRequest(Truncating):
    inputs: Inputs
    prompt_name: str | None = None


class SimilarityInput(BaseModel):
    model_config = ConfigDict(strict=True)
    source_sentence: str
    sentences: list[str]


class SimilarityParameters(BaseModel):
    model_config = ConfigDict(strict=True)
    truncate: bool | None = None
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    prompt_name: str | None = None


class SimilarityRequest(TEIRequest):
    inputs: SimilarityInput
    parameters: SimilarityParameters | None = None


class TEIRerankRequest(Truncating):
    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False


class PredictRequest(Truncating):
    inputs: str | list[str] | list[list[str]] = Field(
        description="a pair [query, text], or a batch of pairs [[query, text], ...]")
    raw_scores: bool = False


class TokenizeRequest(TEIRequest):
    inputs: Inputs
    add_special_tokens: bool = True
    prompt_name: str | None = None


class DecodeRequest(TEIRequest):
    ids: list[int] | list[list[int]]
    skip_special_tokens: bool = True


class SparseValue(BaseModel):
    index: int
    value: float


class Rank(BaseModel):
    index: int
    text: str | None = None
    score: float


class Prediction(BaseModel):
    score: float
    label: str


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


EmbedResponse = RootModel[list[list[float]]]
EmbedSparseResponse = RootModel[list[list[SparseValue]]]
EmbedAllResponse = RootModel[list[list[list[float]]]]
TEIRerankResponse = RootModel[list[Rank]]
PredictResponse = RootModel[list[Prediction] | list[list[Prediction]]]
SimilarityResponse = RootModel[list[float]]
TokenizeResponse = RootModel[list[list[SimpleToken]]]
DecodeResponse = RootModel[list[str]]


class ClassifierModel(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class EmbeddingModel(BaseModel):
    pooling: str


class ModelType(BaseModel):
    """Exactly one of the three, as TEI's serde enum."""
    model_config = ConfigDict(extra="forbid")
    embedding: EmbeddingModel | None = None
    reranker: ClassifierModel | None = None
    classifier: ClassifierModel | None = None


class Info(BaseModel):
    model_id: str
    model_sha: str | None
    model_dtype: str
    served_model_name: str
    model_type: ModelType
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None
    docker_label: str | None


class TEIError(BaseModel):
    error: str
    error_type: Literal["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer",
                        "Empty"]


ERRORS = {s: TEIError for s in (400, 413, 422, 424, 429, 503)}
# TEI's routes here; their errors are TEI's (api/envelopes.py). /rerank takes infinity's body
# too, and answers in TEI's envelope.
PATHS = frozenset({"/", "/embed", "/embed_sparse", "/embed_all", "/predict", "/similarity",
                   "/tokenize", "/decode", "/info", "/rerank"})


class Empty(InvalidRequest):
    """TEI's `Empty` error: 400."""


class NotServed(SIEError):
    """The model cannot do what the route asks (TEI: 424, error_type Backend)."""
    status, code = 424, "MODEL_TYPE"


# ------------------------------------------------------------------ errors

def error_response(request: Request, err: SIEError) -> Response:
    """TEI's {error, error_type} with TEI's status for each kind."""
    if isinstance(err, Empty):
        status, kind = 400, "Empty"
    elif err.status == 413 or err.code == "INPUT_TOO_LONG":
        status, kind = 413, "Validation"
    elif err.code in ("QUEUE_FULL", "RESOURCE_EXHAUSTED"):
        status, kind = 429, "Overloaded"
    elif err.status == 503:
        status, kind = 503, "Unhealthy"
    elif err.status == 401 or err.code in ("NOT_FOUND", "METHOD_NOT_ALLOWED"):  # the route's
        status, kind = err.status, "Validation"  # key or method, not the model's (404 -> 422)
    elif err.status < 500 and err.status != 424:
        status, kind = 422, "Validation"
    else:
        status, kind = 424, "Backend"
    headers = {"Retry-After": str(max(1, round(err.retry_after)))} if err.retry_after else None
    return JSONResponse({"error": err.message, "error_type": kind}, status, headers=headers)


# ------------------------------------------------------------------ helpers

def _texts(inputs: Inputs, field: str = "inputs") -> list[str]:
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    if not texts:
        raise Empty(f"`{field}` cannot be empty")
    for i, t in enumerate(texts):
        check_text(t, f"{field}[{i}]")
    return texts


def _options(req: Any, prompt_name: str | None = None) -> dict[str, Any]:
    """Engine encode options from TEI's truncate / truncation_direction / prompt_name."""
    if req.truncation_direction.lower() == "left":
        raise InvalidRequest("truncation_direction: Left is not supported by this server "
                             "(inputs are cut on the right)")
    options: dict[str, Any] = {"truncate": req.truncate is not False}
    if prompt_name is not None:
        if prompt_name not in ("query", "document", "passage"):
            raise InvalidRequest(f"prompt_name: {prompt_name[:64]!r} is not a prompt of this "
                                 "server's models (query, document, passage)")
        options["is_query"] = prompt_name == "query"
    return options


class Timer:
    """TEI's timing headers (TEI's router/src/lib.rs, ResponseMetadata), in whole
    milliseconds (truncated, as TEI's `as_millis`): x-total-time and x-compute-time from the
    request's arrival to its answer; x-tokenization-time, x-queue-time and x-inference-time
    from the engine's Timing of the request (engine/request.py: disjoint parts of the total),
    summed over its engine calls; x-compute-characters, x-compute-tokens, and x-compute-type
    the device ("cpu", "gpu"; TEI's is always "gpu+optimized")."""

    def __init__(self, request: Request, engine: Engine) -> None:
        self.request, self.arrived = request, time.monotonic()
        self.device = engine.placement.device.type

    def headers(self, texts: list[str], tokens: int) -> dict[str, str]:
        parts = [t.sie(self.arrived) for t in getattr(self.request.state, "timings", ())]
        total = str(int((time.monotonic() - self.arrived) * 1000))

        def ms(key: str) -> str:
            return str(int(sum(p[key] for p in parts)))

        return {"x-compute-type": "gpu" if self.device == "cuda" else self.device,
                "x-compute-time": total, "x-total-time": total,
                "x-tokenization-time": ms("tokenization_ms"), "x-queue-time": ms("queue_ms"),
                "x-inference-time": ms("inference_ms"),
                "x-compute-characters": str(sum(map(len, texts))),
                "x-compute-tokens": str(tokens)}


def _answer(payload: Any, timer: Timer, texts: list[str], tokens: int) -> Response:
    return JSONResponse(payload, headers=timer.headers(texts, tokens))


# ------------------------------------------------------------------ routes

class TEI:
    """TEI's routes over `calls`."""

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def _has(self, model: str, output: str, route: str) -> None:
        h = self.calls.engine.registry.handle(model)
        outputs = h.spec.output_types or FAMILIES[h.spec.family].output_types
        if output not in outputs:
            raise NotServed(f"{route}: {model} does not give {output} outputs "
                            f"(it gives {', '.join(outputs) or 'scores only'})")

    async def embed(self, request: Request, body: Any = None) -> Response:
        timer = Timer(request, self.calls.engine)
        req = validated(EmbedRequest, await self.calls.json(request) if body is None else body)
        texts = _texts(req.inputs)
        model = self.calls.model_or_default(req.model, "embed")
        self._has(model, "dense", "embed")
        options = _options(req, req.prompt_name)
        if not req.normalize:  # the pooled vectors, before the model's own L2 step
            options["normalize"] = False
        results = await self.calls.encode(request, model, texts, ["dense"], options)
        vectors = np.stack([r.dense for r in results]).astype(np.float32)
        if req.dimensions is not None:
            vectors = shorten(vectors, req.dimensions, model, self.calls.engine)
        if req.normalize:
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
        return _answer(vectors.tolist(), timer, texts, sum(r.token_count for r in results))

    async def embed_sparse(self, request: Request, body: Any = None) -> Response:
        timer = Timer(request, self.calls.engine)
        req = validated(EmbedSparseRequest,
                        await self.calls.json(request) if body is None else body)
        texts = _texts(req.inputs)
        model = self.calls.model_or_default(req.model, "embed")
        self._has(model, "sparse", "embed_sparse")
        results = await self.calls.encode(request, model, texts, ["sparse"],
                                          _options(req, req.prompt_name))
        out = [[{"index": int(i), "value": float(v)} for i, v in zip(*r.sparse)]
               for r in results]
        return _answer(out, timer, texts, sum(r.token_count for r in results))

    async def embed_all(self, request: Request) -> Response:
        timer = Timer(request, self.calls.engine)
        req = validated(EmbedSparseRequest, await self.calls.json(request))
        texts = _texts(req.inputs)
        model = self.calls.model_or_default(req.model, "embed")
        self._has(model, "multivector", "embed_all")
        results = await self.calls.encode(request, model, texts, ["multivector"],
                                          _options(req, req.prompt_name))
        return _answer([r.multivector.astype(np.float32).tolist() for r in results], timer,
                       texts, sum(r.token_count for r in results))

    async def similarity(self, request: Request, body: Any = None) -> Response:
        timer = Timer(request, self.calls.engine)
        req = validated(SimilarityRequest,
                        await self.calls.json(request) if body is None else body)
        if not req.inputs.sentences:
            raise Empty("`inputs.sentences` cannot be empty")
        model = self.calls.model_or_default(req.model, "embed")
        self._has(model, "dense", "similarity")
        params = req.parameters or SimilarityParameters()
        texts = _texts([req.inputs.source_sentence, *req.inputs.sentences], "inputs.sentences")
        results = await self.calls.encode(request, model, texts, ["dense"],
                                          _options(params, params.prompt_name))
        v = np.stack([r.dense for r in results]).astype(np.float64)
        v = v / np.linalg.norm(v, axis=1, keepdims=True).clip(min=1e-12)
        return _answer((v[1:] @ v[0]).astype(np.float32).tolist(), timer, texts,
                       sum(r.token_count for r in results))

    def _score_options(self, model: str, raw_scores: bool, req: Any) -> dict[str, Any]:
        """/v1/score options: TEI's raw_scores picks the cross-encoder's activation."""
        options = _options(req)
        if FAMILIES[self.calls.engine.registry.handle(model).spec.family].pair_scoring:
            options["activation"] = "none" if raw_scores else "sigmoid"
        return options

    async def rerank(self, request: Request, body: Any = None) -> Response:
        timer = Timer(request, self.calls.engine)
        req = validated(TEIRerankRequest,
                        await self.calls.json(request) if body is None else body)
        if not req.texts:
            raise Empty("`texts` cannot be empty")
        model = self.calls.model_or_default(req.model, "rerank")
        check_text(req.query, "query")
        texts = _texts(req.texts, "texts")
        result = await self.calls.score(request, model, req.query, texts,
                                        self._score_options(model, req.raw_scores, req))
        ranks = [{"index": int(i), **({"text": texts[i]} if req.return_text else {}),
                  "score": float(result.scores[i])} for i in result.order.tolist()]
        return _answer(ranks, timer, [req.query] * len(texts) + texts, result.input_tokens)

    async def predict(self, request: Request) -> Response:
        """Pairs [query, text] scored by the rerank model (TEI's reranker /predict); a lone
        text is refused: no model here classifies single texts."""
        timer = Timer(request, self.calls.engine)
        req = validated(PredictRequest, await self.calls.json(request))
        if isinstance(req.inputs, str) or len(req.inputs) == 1:
            raise InvalidRequest("inputs: a single text cannot be classified here; this "
                                 "server's /predict scores pairs [query, text]")
        if not req.inputs:
            raise Empty("`inputs` cannot be empty")
        single = isinstance(req.inputs[0], str)
        pairs = [req.inputs] if single else req.inputs
        model = self.calls.model_or_default(req.model, "rerank")
        out, tokens, seen = [], 0, []
        for i, pair in enumerate(pairs):
            if len(pair) != 2:
                raise InvalidRequest(f"inputs[{i}]: a pair [query, text] has 2 strings, "
                                     f"not {len(pair)}")
            check_text(pair[0], f"inputs[{i}][0]")
            check_text(pair[1], f"inputs[{i}][1]")
            result = await self.calls.score(request, model, pair[0], [pair[1]],
                                            self._score_options(model, req.raw_scores, req))
            out.append([{"score": float(result.scores[0]), "label": LABEL}])
            tokens += result.input_tokens
            seen += pair
        return _answer(out[0] if single else out, timer, seen, tokens)

    async def tokenize(self, request: Request) -> Response:
        req = validated(TokenizeRequest, await self.calls.json(request))
        model = self.calls.model_or_default(req.model, "embed")
        texts = _texts(req.inputs)
        opts = _options(Truncating(), req.prompt_name)
        spec = self.calls.engine.registry.handle(model).spec
        prefix = (spec.query_prefix if opts.get("is_query") else spec.document_prefix) \
            if req.prompt_name else ""
        tokenizer = self.calls.tokenizer(model)
        out = [_tokens(tokenizer.tokens(prefix + t, req.add_special_tokens), prefix + t)
               for t in texts]
        return JSONResponse(out)

    async def decode(self, request: Request) -> Response:
        req = validated(DecodeRequest, await self.calls.json(request))
        batch = req.ids if req.ids and isinstance(req.ids[0], list) else [req.ids]
        if not batch or not all(batch):
            raise Empty("`ids` cannot be empty")
        model = self.calls.model_or_default(req.model, "embed")
        tokenizer = self.calls.tokenizer(model)
        for i, ids in enumerate(batch):
            bad = next((x for x in ids if not 0 <= x < tokenizer.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"ids[{i}]: {bad} is not a token id of {model} "
                                     f"(0 to {tokenizer.vocab_size - 1})")
        return JSONResponse([tokenizer.decode(ids, req.skip_special_tokens) for ids in batch])

    async def info(self, request: Request) -> Response:
        return JSONResponse(self.describe())

    def describe(self) -> dict[str, Any]:
        """GET /info for the embedding model (the reranker when no model embeds)."""
        calls, settings = self.calls, self.calls.settings
        try:
            model = calls.default_model("embed")
            kind = "embedding"
        except SIEError:
            model, kind = calls.default_model("rerank"), "reranker"
        h = calls.engine.registry.handle(model)
        info = calls.engine.registry.describe(h)
        family = FAMILIES[h.spec.family]
        if kind == "embedding":
            pooling = "splade" if "dense" not in family.output_types else "model"
            model_type = {"embedding": {"pooling": pooling}}
        else:
            model_type = {"reranker": {"id2label": {"0": LABEL}, "label2id": {LABEL: 0}}}
        return {"model_id": model, "model_sha": None,
                "model_dtype": (info.dtype if info and info.dtype else "float32"),
                "served_model_name": model, "model_type": model_type,
                "max_concurrent_requests": settings.max_connections,
                "max_input_length": (info.max_input_tokens if info and info.max_input_tokens
                                     else 512),
                "max_batch_tokens": settings.max_batch_tokens or 16384,
                "max_batch_requests": None,
                "max_client_batch_size": settings.max_items_per_request,
                "auto_truncate": True, "tokenization_workers": 1,
                "version": __version__, "sha": None, "docker_label": None}

    def operations(self) -> list[Operation]:
        """TEI's routes, answering errors in TEI's shape (POST /rerank is api/app.py's: it
        is infinity's route too)."""
        table = [("/embed", self.embed, "Embed", EmbedRequest, EmbedResponse),
                 ("/embed_sparse", self.embed_sparse, "Sparse embed", EmbedSparseRequest,
                  EmbedSparseResponse),
                 ("/embed_all", self.embed_all, "Token embeddings", EmbedSparseRequest,
                  EmbedAllResponse),
                 ("/predict", self.predict, "Score pairs", PredictRequest, PredictResponse),
                 ("/similarity", self.similarity, "Sentence similarity", SimilarityRequest,
                  SimilarityResponse),
                 ("/tokenize", self.tokenize, "Tokenize", TokenizeRequest, TokenizeResponse),
                 ("/decode", self.decode, "Decode token ids", DecodeRequest, DecodeResponse),
                 ("/", self.root, "TEI's default route: embed, or a similarity body",
                  EmbedRequest | SimilarityRequest, EmbedResponse | SimilarityResponse
                  | EmbedSparseResponse)]
        return [Operation("POST", path, handler, f"{summary} (TEI)", "TEI", request,
                          {200: response, **ERRORS})
                for path, handler, summary, request, response in table] + [
            Operation("GET", "/info", self.info, "Model info (TEI)", "TEI", None,
                      {200: Info, **ERRORS})]

    async def root(self, request: Request) -> Response:
        """POST /: TEI's default route for the embedding model (also a similarity body)."""
        body = await self.calls.json(request)
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if isinstance(inputs, dict):
            return await self.similarity(request, body)
        try:
            model = self.calls.model_or_default(
                body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str)
                else None, "embed")
        except SIEError:
            return await self.rerank(request, body)
        h = self.calls.engine.registry.handle(model)
        if "dense" not in (h.spec.output_types or FAMILIES[h.spec.family].output_types):
            return await self.embed_sparse(request, body)
        return await self.embed(request, body)


def _tokens(encoding: Any, text: str) -> list[dict[str, Any]]:
    """TEI's SimpleTokens: special tokens by name without offsets; others as the text they
    cover, with byte offsets into it."""
    out = []
    for tid, token, special, (start, stop) in zip(encoding.ids, encoding.tokens,
                                                  encoding.special_tokens_mask, encoding.offsets):
        if special:
            out.append({"id": tid, "text": token, "special": True, "start": None, "stop": None})
        else:
            b0, b1 = len(text[:start].encode()), len(text[:stop].encode())
            out.append({"id": tid, "text": text[start:stop], "special": False,
                        "start": b0, "stop": b1})
    return out
