"""The Starlette application: routes, body limits, error mapping, readiness."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import threading
from typing import Any, Callable

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from ..engine import Engine
from ..errors import BodyTooLarge, DeadlineExceeded, ModelNotFound, SIEError
from ..logs import request_id
from . import models as model_info
from . import openai, page, status
from . import tokens as tokens_api
from .middleware import ServerMiddleware
from .validate import parse_encode, parse_extract, parse_score, parse_timeout
from .waker import LoopWaker
from .wire import (JSON, MSGPACK, SIE_PROTOCOL_VERSION, decode_body, encode_body,
                   encode_response, error_body, extract_to_wire, score_to_wire,
                   wants_msgpack)

log = logging.getLogger(__name__)

PRELOAD_TIMEOUT_S = 3600.0
# Requests with at most this many characters of text are tokenized on the event loop.
_INLINE_CHARS = 2048
_WATCH_AFTER_S = 0.05  # requests still waiting after this long watch for a disconnect
# Results bigger than this many floats are serialized in a worker thread, off the event loop.
_OFFLOAD_FLOATS = 1 << 16


def respond(request: Request, payload: Any, status: int = 200,
            headers: dict[str, str] | None = None) -> Response:
    binary = wants_msgpack(request.headers.get("accept", ""))
    return Response(encode_body(payload, binary), status,
                    media_type=MSGPACK if binary else JSON, headers=headers)


_MAX_MESSAGE_CHARS = 2000  # an error never echoes more of the client's input than this


def error_response(request: Request, err: SIEError) -> Response:
    """SIE's error envelope (always JSON, as SIE sends it), its code in X-SIE-Error-Code;
    the OpenAI route answers in OpenAI's envelope instead. The message is kept in the
    request's state for ServerMiddleware, which counts errors by code."""
    headers = {"X-SIE-Error-Code": err.code}
    if err.retry_after:
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    if len(err.message) > _MAX_MESSAGE_CHARS:
        err.message = err.message[:_MAX_MESSAGE_CHARS] + " ..."
    request.state.error = err.message
    if request.url.path.startswith(openai.PATH):
        body = openai.error_body(err)
    else:
        body = error_body(err, request_id.get())
    return Response(encode_body(body, False), err.status, media_type=JSON, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it grows past `limit` bytes; a client that
    goes away before sending all of it is ClientDisconnected (499)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected() from None
    return b"".join(chunks)


TIMEOUT_HEADER = "x-request-timeout"  # seconds; same as options.timeout_s


def with_deadline(request: Request, options: dict[str, Any]) -> dict[str, Any]:
    """Options with `timeout_s` taken from the X-Request-Timeout header when not set."""
    header = request.headers.get(TIMEOUT_HEADER)
    if header is None or options.get("timeout_s") is not None:
        return options
    return {**options, "timeout_s": parse_timeout(header, f"header {TIMEOUT_HEADER}")}


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def await_result(request: Request, future: concurrent.futures.Future,
                       timeout: float | None, waker: LoopWaker) -> Any:
    """The engine's result; past the deadline 504, and a client that disconnects has its queued
    work dropped. Either way the engine's future is cancelled. Most results come within
    `_WATCH_AFTER_S`: only requests still waiting then get a task watching for a disconnect."""
    result = waker.watch(future)
    first = _WATCH_AFTER_S if timeout is None else min(timeout, _WATCH_AFTER_S)
    done, _ = await asyncio.wait({result}, timeout=first)
    if not done:
        gone = asyncio.ensure_future(_disconnected(request))
        left = None if timeout is None else max(timeout - first, 0.0)
        try:
            done, _ = await asyncio.wait({result, gone}, timeout=left,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if gone in done and result not in done:
            future.cancel()
            result.cancel()
            log.info("client disconnected; its queued work is dropped")
            raise ClientDisconnected()
    if result in done:
        return result.result()
    future.cancel()
    result.cancel()
    raise DeadlineExceeded(f"no result within the request's deadline of {timeout}s")


def tenant_of(request: Request) -> str | None:
    """The API key's identity set by ServerMiddleware (None without keys)."""
    return request.scope.get("state", {}).get("tenant")


class ClientDisconnected(Exception):
    """Nobody is left to answer."""


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
    settings = engine.settings
    ready = threading.Event()
    load_errors: list[str] = []

    waker: LoopWaker | None = None

    def loop_waker() -> LoopWaker:
        """The LoopWaker of the loop serving this request (normally always the same one)."""
        nonlocal waker
        loop = asyncio.get_running_loop()
        if waker is None or waker.loop is not loop:
            waker = LoopWaker(loop)
        return waker

    def load_defaults_in_background() -> None:
        for name in engine.registry.defaults:
            try:
                engine.registry.get(name, timeout=PRELOAD_TIMEOUT_S)
            except SIEError as err:
                load_errors.append(err.message)
        ready.set()

    async def read_call(request: Request, parse: Callable[[Any, int], Any]):
        """(model from the path, the validated body, its options with the deadline header)."""
        model = request.state.model = request.path_params["model"]
        body = decode_body(await read_body(request, settings.max_body_bytes),
                           request.headers.get("content-type", ""))
        call = parse(body, settings.max_items_per_request)
        return model, call, with_deadline(request, call.options)

    async def encode(request: Request) -> Response:
        model, call, options = await read_call(request, parse_encode)
        if (all(isinstance(t, str) for t in call.texts)  # images are decoded off the loop
                and sum(map(len, call.texts)) <= _INLINE_CHARS and not options.get("lora_id")
                and engine.registry.is_ready(model)):
            # a few short texts: tokenizing them costs less than a hop to a worker thread
            future = engine.submit(model, call.texts, call.output_types, options,
                                   tenant=tenant_of(request))
        else:  # loading, adapter loads and long tokenization never run on the event loop
            future = await anyio.to_thread.run_sync(functools.partial(
                engine.submit, model, call.texts, call.output_types, options,
                tenant=tenant_of(request)))
        results = await await_result(request, future, options.get("timeout_s"), loop_waker())
        if call.normalize:
            results = normalized(results)
        binary = wants_msgpack(request.headers.get("accept", ""))
        sparse_dims = None
        if "sparse" in call.output_types:
            info = engine.registry.describe(engine.registry.handle(model))
            sparse_dims = info.dims.get("sparse") if info else None

        def build() -> bytes:
            return encode_body(encode_response(model, call.ids, results, call.output_dtype,
                                               sparse_dims, binary), binary)

        floats = sum(r.multivector.size for r in results if r.multivector is not None)
        content = await anyio.to_thread.run_sync(build) if floats > _OFFLOAD_FLOATS else build()
        return Response(content, media_type=MSGPACK if binary else JSON)

    async def score(request: Request) -> Response:
        model, call, options = await read_call(request, parse_score)
        future = await anyio.to_thread.run_sync(functools.partial(
            engine.submit_score, model, call.query, call.texts, options, call.top_k,
            tenant=tenant_of(request)))
        result = await await_result(request, future, options.get("timeout_s"), loop_waker())
        return respond(request, score_to_wire(model, call.query_id, call.ids, result,
                                              result.input_tokens))

    async def extract(request: Request) -> Response:
        model, call, options = await read_call(request, parse_extract)
        future = await anyio.to_thread.run_sync(functools.partial(
            engine.submit_extract, model, call.texts, call.labels, options,
            tenant=tenant_of(request)))
        results, tokens = await await_result(request, future, options.get("timeout_s"),
                                             loop_waker())
        return respond(request, extract_to_wire(model, call.ids, results, tokens))

    async def models(request: Request) -> Response:
        """SIE's `{"models": [ModelInfo]}` and OpenAI's `{"object": "list", "data"}` at once."""
        entries = await anyio.to_thread.run_sync(
            lambda: [model_info.entry(engine, h) for h in engine.registry.handles()])
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
            return respond(request, entry)
        names = {h.spec.name for h in engine.registry.handles()}
        model, lora_id = split_adapter_path(path, names)
        if request.method == "POST":
            info = await anyio.to_thread.run_sync(engine.load_adapter, model, lora_id)
            return respond(request, {"model": model, "adapter": info})
        info = await anyio.to_thread.run_sync(engine.unload_adapter, model, lora_id)
        return respond(request, {"model": model, "unloaded": info})

    async def embeddings(request: Request) -> Response:
        """OpenAI-compatible embeddings (JSON only, as the OpenAI clients speak)."""
        body = decode_body(await read_body(request, settings.max_body_bytes), JSON)
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            request.state.model = body["model"][:200]
        call = openai.parse(body)
        options = with_deadline(request, {})
        future = await anyio.to_thread.run_sync(functools.partial(
            engine.submit, call.model, call.texts, ["dense"], options, tenant=tenant_of(request)))
        results = await await_result(request, future, options.get("timeout_s"), loop_waker())
        payload = await anyio.to_thread.run_sync(openai.response, engine, call, results)
        return Response(encode_body(payload, False), media_type=JSON)

    async def tokens(request: Request) -> Response:
        model, call, _ = await read_call(request, tokens_api.parse)
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
        """SIE's worker answer to the SDK's endpoint probe (`type` is not "gateway")."""
        response = await healthz(request)
        status = "ok" if response.status_code == 200 else "unhealthy"
        return Response(encode_body({"status": status, "type": "worker", "version": __version__,
                                     "sie_protocol": SIE_PROTOCOL_VERSION}, False),
                        response.status_code, media_type=JSON)

    async def livez(request: Request) -> Response:
        return Response("ok", media_type="text/plain")

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}
        err = SIEError(str(exc.detail))
        err.status, err.code = exc.status_code, codes.get(exc.status_code, "HTTP_ERROR")
        return error_response(request, err)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if load_defaults:
            threading.Thread(target=load_defaults_in_background, daemon=True).start()
        else:
            ready.set()
        yield
        await anyio.to_thread.run_sync(engine.close)

    routes = [
        Route("/v1/encode/{model:path}", handled(encode), methods=["POST"]),
        Route("/v1/score/{model:path}", handled(score), methods=["POST"]),
        Route("/v1/extract/{model:path}", handled(extract), methods=["POST"]),
        Route("/v1/models", handled(models), methods=["GET"]),
        Route("/v1/models/{path:path}", handled(model_route), methods=["GET", "POST", "DELETE"]),
        Route(openai.PATH, handled(embeddings), methods=["POST"]),
        Route("/v1/tokens/{model:path}", handled(tokens), methods=["POST"]),
        Route("/status", handled(status_route), methods=["GET"]),
        Route("/metrics", handled(metrics), methods=["GET"]),
        Route("/healthz", handled(healthz), methods=["GET"]),
        Route("/readyz", handled(readyz), methods=["GET"]),
        Route("/health", handled(health), methods=["GET"]),
        Route("/livez", handled(livez), methods=["GET"]),
        *page.routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: on_http_error})
    app.add_middleware(ServerMiddleware, api_keys=settings.api_keys, metrics=engine.metrics)
    return app


def handled(route: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """A route's expected outcomes become responses here: SIE errors get their status and
    envelope, a client gone away 499. Anything else is a bug, left to ServerMiddleware, the one
    place that logs it (once, with the request id) and answers 500; none of these closes the
    keep-alive connection."""

    async def run(request: Request) -> Response:
        try:
            return await route(request)
        except SIEError as err:
            return error_response(request, err)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it; for logs and metrics

    return run


def normalized(results: list) -> list:
    """Results whose dense vectors are L2-normalised (options.normalize: true)."""
    out = []
    for r in results:
        if r.dense is not None:
            norm = float(np.linalg.norm(r.dense))
            r = dataclasses.replace(r, dense=r.dense / norm if norm > 0 else r.dense)
        out.append(r)
    return out
