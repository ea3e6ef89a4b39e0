"""What every wire module needs from the server, in one place: reading a bounded body,
deadlines, waiting for the engine (with disconnect watching), and the engine's encode and
score calls. The protocol modules (SIE's in app.py, openai.py, tei.py, rerank.py,
infinity.py) only translate their wire format to these calls and back."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from typing import Any

import anyio
from starlette.requests import ClientDisconnect, Request

from ..engine import Engine
from ..engine.request import ItemResult, Timing
from ..engine.scoring import ScoreResult
from ..errors import BodyTooLarge, DeadlineExceeded, ModelNotFound
from ..models import FAMILIES
from .validate import parse_timeout
from .waker import LoopWaker
from .wire import JSON, decode_body

log = logging.getLogger(__name__)

# Requests with at most this many characters of text are tokenized on the event loop.
_INLINE_CHARS = 2048
_WATCH_AFTER_S = 0.05  # requests still waiting after this long watch for a disconnect
TIMEOUT_HEADER = "x-request-timeout"  # seconds; same as options.timeout_s


class ClientDisconnected(Exception):
    """Nobody is left to answer."""


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


def _timed(request: Request, timing: Timing) -> None:
    """Keep an engine call's Timing on the request: `timing` the last call's (SIE's routes
    make one), `timings` every call's (TEI's headers sum them)."""
    request.state.timing = timing
    request.state.timings = [*getattr(request.state, "timings", ()), timing]


def tenant_of(request: Request) -> str | None:
    """The API key's identity set by ServerMiddleware (None without keys)."""
    return request.scope.get("state", {}).get("tenant")


class Calls:
    """The engine as the wire modules call it (one per app)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self._waker: LoopWaker | None = None

    def waker(self) -> LoopWaker:
        """The LoopWaker of the loop serving this request (normally always the same one)."""
        loop = asyncio.get_running_loop()
        if self._waker is None or self._waker.loop is not loop:
            self._waker = LoopWaker(loop)
        return self._waker

    async def json(self, request: Request) -> Any:
        """The JSON body (bounded by max_body_bytes)."""
        return decode_body(await read_body(request, self.settings.max_body_bytes), JSON)

    async def body(self, request: Request) -> Any:
        """The body as its Content-Type says: JSON or msgpack."""
        return decode_body(await read_body(request, self.settings.max_body_bytes),
                           request.headers.get("content-type", ""))

    async def encode(self, request: Request, model: str, texts: list, output_types: list[str],
                     options: dict[str, Any]) -> list[ItemResult]:
        """The engine's results for `texts` (deadline from options or the header)."""
        request.state.model = model
        options = with_deadline(request, options)
        submit = functools.partial(self.engine.submit, model, texts, output_types, options,
                                   tenant=tenant_of(request))
        if (all(isinstance(t, str) for t in texts)  # images are decoded off the loop
                and sum(map(len, texts)) <= _INLINE_CHARS and not options.get("lora_id")
                and not options.get("profile") and ":" not in model  # a profile may load a LoRA
                and self.engine.registry.is_ready(model)):
            future = submit()  # a few short texts: tokenizing costs less than a thread hop
        else:  # loading, adapter loads and long tokenization never run on the event loop
            future = await anyio.to_thread.run_sync(submit)
        _timed(request, future.timing)
        return await await_result(request, future, options.get("timeout_s"), self.waker())

    async def score(self, request: Request, model: str, query: Any, texts: list,
                    options: dict[str, Any], top_k: int | None = None) -> ScoreResult:
        """The engine's ScoreResult of `texts` against `query` (the path of /v1/score)."""
        request.state.model = model
        options = with_deadline(request, options)
        future = await anyio.to_thread.run_sync(functools.partial(
            self.engine.submit_score, model, query, texts, options, top_k,
            tenant=tenant_of(request)))
        _timed(request, future.timing)
        return await await_result(request, future, options.get("timeout_s"), self.waker())

    async def extract(self, request: Request, model: str, texts: list[str],
                      labels: list[str] | None, options: dict[str, Any]):
        """The engine's (results, input tokens) of extracting `labels` from `texts`."""
        request.state.model = model
        options = with_deadline(request, options)
        future = await anyio.to_thread.run_sync(functools.partial(
            self.engine.submit_extract, model, texts, labels, options,
            tenant=tenant_of(request)))
        return await await_result(request, future, options.get("timeout_s"), self.waker())

    def served(self, name: str) -> str:
        """`name` if this server has it, else 404."""
        if self.engine.registry.handle(name) is None:
            raise ModelNotFound(f"Model '{name[:200]}' not found")
        return name

    def default_model(self, role: str) -> str:
        """The model the protocols without a `model` field use: `--embed-model` /
        `--rerank-model`, else the first default model (--default-model) that can do `role`
        ("embed": dense vectors; "rerank": a cross-encoder, else a model with its own scores)."""
        chosen = self.settings.embed_model if role == "embed" else self.settings.rerank_model
        if chosen:
            return self.served(chosen)
        registry = self.engine.registry
        handles = [registry.handle(n) for n in registry.defaults or []]
        fits = ([lambda f: f.pair_scoring, lambda f: bool(f.score_types)] if role == "rerank"
                else [lambda f: "dense" in f.output_types])
        for fit in fits:
            for h in handles:
                if h is not None and fit(FAMILIES[h.spec.family]):
                    return h.spec.name
        flag = "--embed-model" if role == "embed" else "--rerank-model"
        raise ModelNotFound(f"no {role} model is set: start the server with {flag} NAME "
                            "(or send `model`)")

    def model_or_default(self, name: str | None, role: str) -> str:
        """The client's `model` when it names a served model, else the role's default."""
        return self.served(name) if name else self.default_model(role)

    def tokenizer(self, model: str):
        """The loaded model's TextTokenizer (loads the model if needed)."""
        return self.engine.registry.get(model, timeout=self.settings.model_load_timeout_s) \
            .model.tokenizer
