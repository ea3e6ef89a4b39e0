"""The Starlette application: routes, body limits, error mapping, readiness.

Every route is one `Operation` in `operations()` below: the same table makes the app's routes
and its OpenAPI document (api/openapi.py). Each protocol's wire format lives in its own module
(openai.py, tei.py, rerank.py, infinity.py; SIE's in wire.py / validate.py) over api/calls.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from ..engine import Engine
from ..errors import ModelNotFound, NotServed, SIEError
from . import infinity as infinity_api
from . import models as model_info
from . import openai, page, status
from . import openapi
from . import rerank as rerank_api
from . import tei as tei_api
from . import tokens as tokens_api
from . import validate
from .calls import Calls, ClientDisconnected
from .envelopes import renderer
from .middleware import ServerMiddleware
from .openapi import BOTH, Operation
from .validate import parse_encode, parse_extract, parse_score
from .wire import (JSON, MSGPACK, SIE_PROTOCOL_VERSION, encode_body, encode_response,
                   extract_to_wire, score_to_wire, timing_headers,
                   wants_msgpack)

log = logging.getLogger(__name__)

PRELOAD_TIMEOUT_S = 3600.0
# Routes of SIE's server (sie-server 0.10.1, api/*.py) for features this server does not
# have: answered 501 in SIE's error envelope, naming the feature, not a bare 404.
UNSERVED = {
    "/v1/generate/{model:path}": "text generation (/v1/generate)",
    "/v1/chat/completions": "chat completions (/v1/chat/completions)",
    "/v1/completions": "text completions (/v1/completions)",
    "/v1/responses": "the OpenAI Responses API (/v1/responses)",
    "/v1/audio/{path:path}": "audio (/v1/audio: transcription)",
}
# Results bigger than this many floats are serialized in a worker thread, off the event loop.
_OFFLOAD_FLOATS = 1 << 16


def respond(request: Request, payload: Any, status: int = 200,
            headers: dict[str, str] | None = None) -> Response:
    binary = wants_msgpack(request.headers.get("accept", ""))
    return Response(encode_body(payload, binary), status,
                    media_type=MSGPACK if binary else JSON, headers=headers)


_MAX_MESSAGE_CHARS = 2000  # an error never echoes more of the client's input than this


def split_adapter_path(path: str, models: set[str]) -> tuple[str, str]:
    """"{model}/adapters/{lora_id}" -> (model, lora_id); both may contain "/", so the split is
    at the first "/adapters/" whose left side is a served model (else the first one)."""
    marker = "/adapters/"
    cuts = [i for i in range(len(path)) if path.startswith(marker, i)]
    if not cuts:
        raise HTTPException(404, f"no route /v1/models/{path}; adapters live at "
                                 "/v1/models/{model}/adapters/{lora_id}")
    cut = next((i for i in cuts if path[:i] in models), cuts[0])
    model, lora_id = path[:cut], path[cut + len(marker):]
    if not lora_id:
        raise HTTPException(404, "the adapter id is missing: /v1/models/{model}/adapters/{lora_id}")
    return model, lora_id


def create_app(engine: Engine, *, load_defaults: bool = True) -> Starlette:
    """The HTTP app over an engine; default models load in the background at start-up."""
    ready = threading.Event()
    load_errors: list[str] = []

    def load_defaults_in_background() -> None:
        for name in engine.registry.defaults:
            try:
                engine.registry.get(name, timeout=PRELOAD_TIMEOUT_S)
            except SIEError as err:
                load_errors.append(err.message)
        ready.set()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if load_defaults:
            threading.Thread(target=load_defaults_in_background, daemon=True).start()
        else:
            ready.set()
        yield
        await anyio.to_thread.run_sync(engine.close)

    ops = operations(Calls(engine), ready, load_errors)
    first = (engine.registry.defaults or [None])[0]
    docs = openapi.routes(ops, {"model": first, "path": first} if first else None)
    prefix = engine.settings.infinity_prefix
    routes = [Route(op.path, handled(op.handler, renderer(op.path, prefix)),
                    methods=[op.method]) for op in ops]
    routes += [Route("/openapi.json", docs["openapi"], methods=["GET"]),
               Route("/docs", docs["docs"], methods=["GET"]),
               Route("/docs/{name}", docs["asset"], methods=["GET"]),
               *page.routes()]

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}
        err = SIEError(str(exc.detail))
        err.status, err.code = exc.status_code, codes.get(exc.status_code, "HTTP_ERROR")
        request.state.error = err.message
        return renderer(request.url.path, prefix)(request, err)

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: on_http_error})
    app.add_middleware(ServerMiddleware, api_keys=engine.settings.api_keys,
                       metrics=engine.metrics, infinity_prefix=prefix)
    return app


def operations(calls: Calls, ready: threading.Event, load_errors: list[str]) -> list[Operation]:
    """Every route of the server (SIE, OpenAI, TEI, rerank, infinity, health)."""
    engine, settings = calls.engine, calls.settings

    async def read_call(request: Request, parse: Callable[[Any, int], Any]):
        """(model from the path, the validated body)."""
        model = request.state.model = request.path_params["model"]
        return model, parse(await calls.body(request), settings.max_items_per_request)

    async def encode(request: Request) -> Response:
        arrived = time.monotonic()
        model, call = await read_call(request, parse_encode)
        results = await calls.encode(request, model, call.texts, call.output_types, call.options)
        binary = wants_msgpack(request.headers.get("accept", ""))
        sparse_dims = None
        if any(r.sparse is not None for r in results):
            info = engine.registry.describe(engine.registry.handle(model))
            sparse_dims = info.dims.get("sparse") if info else None
        timing = request.state.timing.sie(arrived)

        def build() -> bytes:
            return encode_body(encode_response(model, call.ids, results, call.output_dtype,
                                               sparse_dims, binary, timing), binary)

        floats = sum(r.multivector.size for r in results if r.multivector is not None)
        content = await anyio.to_thread.run_sync(build) if floats > _OFFLOAD_FLOATS else build()
        return Response(content, media_type=MSGPACK if binary else JSON,
                        headers=timing_headers(timing))

    async def score(request: Request) -> Response:
        arrived = time.monotonic()
        model, call = await read_call(request, parse_score)
        result = await calls.score(request, model, call.query, call.texts, call.options,
                                   call.top_k)
        timing = request.state.timing.sie(arrived)
        return respond(request, score_to_wire(model, call.query_id, call.ids, result,
                                              result.input_tokens, timing),
                       headers=timing_headers(timing))

    async def extract(request: Request) -> Response:
        model, call = await read_call(request, parse_extract)
        results, tokens = await calls.extract(request, model, call.texts, call.labels,
                                              call.options)
        return respond(request, extract_to_wire(model, call.ids, results, tokens))

    async def models(request: Request) -> Response:
        """SIE's `{"models": [ModelInfo]}` and OpenAI's `{"object": "list", "data"}` at once."""
        def listing() -> list[dict[str, Any]]:
            out = []
            for h in engine.registry.handles():
                e = model_info.entry(engine, h)
                out += [e, *model_info.variants(e, h)]
            return out

        entries = await anyio.to_thread.run_sync(listing)
        return respond(request, {"object": "list", "data": [model_info.openai_entry(e)
                                                            for e in entries],
                                 "models": entries})

    async def model_route(request: Request) -> Response:
        """GET /v1/models/{model}; POST (preload) / DELETE (unload) of
        /v1/models/{model}/adapters/{lora_id}."""
        path = request.path_params["path"]
        if request.method == "GET":
            handle = engine.registry.handle(path)
            if handle is None:
                raise ModelNotFound(f"Model '{path[:200]}' not found")
            entry = await anyio.to_thread.run_sync(model_info.entry, engine, handle)
            if path != handle.spec.name:  # model:profile
                entry = model_info.variant(entry, handle, path[len(handle.spec.name) + 1:])
            return respond(request, entry)
        names = {h.spec.name for h in engine.registry.handles()}
        model, lora_id = split_adapter_path(path, names)
        if request.method == "POST":
            info = await anyio.to_thread.run_sync(engine.load_adapter, model, lora_id)
            return respond(request, {"model": model, "adapter": info})
        info = await anyio.to_thread.run_sync(engine.unload_adapter, model, lora_id)
        return respond(request, {"model": model, "unloaded": info})

    async def embeddings(request: Request) -> Response:
        """OpenAI-compatible embeddings (JSON only, as the OpenAI clients speak); TEI serves
        this route too, so TEI's timing headers come along."""
        timer = tei_api.Timer(request, engine)
        body = await calls.json(request)
        if isinstance(body, dict) and body.get("model") is None:  # TEI's route takes none
            body["model"] = calls.default_model("embed")
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            request.state.model = body["model"][:200]
        call = openai.parse(body)
        results = await calls.encode(request, call.model, call.texts, ["dense"], {})
        payload = await anyio.to_thread.run_sync(openai.response, engine, call, results)
        return Response(encode_body(payload, False), media_type=JSON,
                        headers=timer.headers(call.texts, payload["usage"]["prompt_tokens"]))

    async def tokens(request: Request) -> Response:
        model, call = await read_call(request, tokens_api.parse)
        body = await anyio.to_thread.run_sync(tokens_api.run, engine, model, call)
        return respond(request, body)

    async def status_route(request: Request) -> Response:
        return respond(request, status.build(engine))

    async def metrics(request: Request) -> Response:
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    async def healthz(request: Request) -> Response:
        dead = [h.spec.name for h in engine.registry.handles()
                if h.scheduler is not None and not h.scheduler.alive]
        if dead:
            return respond(request, {"status": "unhealthy", "dead_workers": dead}, 503)
        return respond(request, {"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not ready.is_set():
            return respond(request, {"status": "loading"}, 503)
        if load_errors:
            return respond(request, {"status": "failed", "errors": load_errors}, 503)
        return respond(request, {"status": "ready"})

    async def health(request: Request) -> Response:
        """SIE's worker answer to the SDK's endpoint probe (`type` is not "gateway"); also
        TEI's and infinity's health route (200 when healthy)."""
        response = await healthz(request)
        status = "ok" if response.status_code == 200 else "unhealthy"
        return Response(encode_body({"status": status, "type": "worker", "version": __version__,
                                     "sie_protocol": SIE_PROTOCOL_VERSION}, False),
                        response.status_code, media_type=JSON)

    async def livez(request: Request) -> Response:
        return Response("ok", media_type="text/plain")

    tei = tei_api.TEI(calls)
    cohere = rerank_api.Rerank(calls)
    inf = infinity_api.Infinity(calls)

    async def rerank_root(request: Request) -> Response:
        """POST /rerank: TEI's body (`texts`) or infinity's (`documents`)."""
        body = await calls.json(request)
        if isinstance(body, dict) and "documents" in body and "texts" not in body:
            return await inf.rerank(request, body)
        return await tei.rerank(request, body)

    sie_errors = {400: validate.SIEErrorResponse, 404: validate.SIEErrorResponse,
                  408: validate.SIEErrorResponse, 413: validate.SIEErrorResponse,
                  503: validate.SIEErrorResponse}
    oai_errors = {s: openai.OpenAIError for s in (400, 404, 408, 413, 503)}
    co_errors = {s: rerank_api.RerankError for s in (400, 404, 408, 413, 503)}
    co2_errors = {s: rerank_api.CohereError for s in (400, 404, 408, 413, 503)}
    health_body = dict[str, Any]
    t, sie, oai, co, inf_tag = "TEI", "SIE", "OpenAI", "Cohere / Jina / SIE rerank", "infinity"
    ops = [
        Operation("POST", "/v1/encode/{model:path}", encode, "Encode items (SIE)", sie,
                  validate.EncodeRequest, {200: validate.EncodeResponse, **sie_errors},
                  BOTH, path_params=("model",)),
        Operation("POST", "/v1/score/{model:path}", score, "Score items against a query (SIE)",
                  sie, validate.ScoreRequest, {200: validate.ScoreResponse, **sie_errors},
                  BOTH, path_params=("model",)),
        Operation("POST", "/v1/extract/{model:path}", extract,
                  "Extract entities or classifications (SIE)", sie, validate.ExtractRequest,
                  {200: validate.ExtractResponse, **sie_errors}, BOTH, path_params=("model",)),
        Operation("GET", "/v1/models", models, "Served models (SIE and OpenAI)", sie, None,
                  {200: dict[str, Any]}, BOTH),
        Operation("GET", "/v1/models/{path:path}", model_route, "One model (SIE)", sie, None,
                  {200: dict[str, Any], 404: validate.SIEErrorResponse}, BOTH,
                  path_params=("path",)),
        Operation("POST", "/v1/models/{path:path}", model_route,
                  "Load a LoRA adapter: /v1/models/{model}/adapters/{lora_id}", sie, None,
                  {200: dict[str, Any], **sie_errors, 422: validate.SIEErrorResponse}, BOTH,
                  path_params=("path",)),
        Operation("DELETE", "/v1/models/{path:path}", model_route, "Unload a LoRA adapter",
                  sie, None, {200: dict[str, Any], **sie_errors}, BOTH, path_params=("path",)),
        Operation("POST", openai.PATH, embeddings, "Embeddings (OpenAI)", oai,
                  openai.EmbeddingsRequest, {200: openai.EmbeddingsResponse, **oai_errors}),
        Operation("POST", "/v1/rerank", cohere.v1, "Rerank (SIE, Cohere v1, Jina)", co,
                  rerank_api.RerankRequest, {200: rerank_api.RerankResponse, **co_errors}),
        Operation("POST", "/v2/rerank", cohere.v2, "Rerank (Cohere v2)", co,
                  rerank_api.RerankV2Request, {200: rerank_api.RerankResponse, **co2_errors}),
        Operation("POST", "/rerank", rerank_root, "Rerank (TEI: texts; infinity: documents)",
                  t, tei_api.TEIRerankRequest | infinity_api.InfinityRerankRequest,
                  {200: tei_api.TEIRerankResponse | infinity_api.InfinityRerankResponse,
                   **tei_api.ERRORS}),
        *tei.operations(),
        Operation("POST", "/embeddings", inf.embeddings, "Embeddings (infinity / OpenAI)",
                  inf_tag, infinity_api.InfinityEmbeddingsRequest,
                  {200: openai.EmbeddingsResponse, **oai_errors}),
        Operation("GET", "/models", inf.models, "Models (infinity)", inf_tag, None,
                  {200: infinity_api.InfinityModels}),
        Operation("POST", "/v1/tokens/{model:path}", tokens,
                  "The tokens a model computes on, and token ids as text", sie,
                  tokens_api.TokensRequest, {200: dict[str, Any], **sie_errors}, BOTH,
                  path_params=("model",)),
        Operation("GET", "/status", status_route, "The engine's counters (the page's status)",
                  "health", None, {200: dict[str, Any]}, BOTH),
        Operation("GET", "/metrics", metrics, "Prometheus metrics", "health", None,
                  {200: str}, response_media="text/plain"),
        Operation("GET", "/healthz", healthz, "Liveness of the workers", "health", None,
                  {200: health_body, 503: health_body}),
        Operation("GET", "/readyz", readyz, "Default models loaded", "health", None,
                  {200: health_body, 503: health_body}),
        Operation("GET", "/health", health, "SIE's / TEI's / infinity's health", "health", None,
                  {200: health_body, 503: health_body}),
        Operation("GET", "/livez", livez, "The process answers", "health", None, {200: str},
                  response_media="text/plain"),
        *(Operation(method, path, unserved(feature), f"Not served: {feature}", "not served",
                    None, {501: validate.SIEErrorResponse},
                    path_params=tuple(p for p in ("model", "path") if "{" + p in path))
          for path, feature in UNSERVED.items() for method in ("GET", "POST")),
    ]
    prefix = settings.infinity_prefix.rstrip("/")
    if prefix:
        ops += [dataclasses.replace(op, path=prefix + op.path) for op in ops
                if op.tag == inf_tag] + [
            Operation("POST", prefix + "/rerank", inf.rerank, "Rerank (infinity)", inf_tag,
                      infinity_api.InfinityRerankRequest,
                      {200: infinity_api.InfinityRerankResponse, **oai_errors})]
    return ops


def handled(route: Callable[[Request], Any],
            render: Callable[[Request, SIEError], Response]) -> Callable[[Request], Any]:
    """A route's expected outcomes become responses here: SIE errors get their status and
    their protocol's envelope (`render`, api/envelopes.py), a client gone away 499. Anything
    else is a bug, left to ServerMiddleware, the one place that logs it (once, with the
    request id) and answers 500; none of these closes the keep-alive connection."""

    async def run(request: Request) -> Response:
        try:
            return await route(request)
        except SIEError as err:
            if len(err.message) > _MAX_MESSAGE_CHARS:
                err.message = err.message[:_MAX_MESSAGE_CHARS] + " ..."
            request.state.error = err.message  # ServerMiddleware counts errors by code
            return render(request, err)  # every envelope carries X-SIE-Error-Code
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it; for logs and metrics

    return run


def unserved(feature: str) -> Callable[[Request], Any]:
    """The route of a SIE feature this server does not have: 501 naming it."""
    async def refuse(request: Request) -> Response:
        raise NotServed(f"{feature} is not served by this server; it serves embeddings "
                        "(/v1/encode, /v1/embeddings) and scores (/v1/score)")
    return refuse
