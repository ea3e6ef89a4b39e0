"""Synchronous and asynchronous HTTP clients of the SIE server.

Transient refusals are retried, honouring the server's Retry-After, within bounds
(`max_retries` attempts and `retry_timeout` seconds per request): 429, and 503 with SIE's
MODEL_LOADING, LORA_LOADING, QUEUE_FULL or RESOURCE_EXHAUSTED (or any 503 with Retry-After).
Everything else, and a retry budget spent, raises an `SIEError` subclass. A list split into
several requests is sent whole: if some of them fail, the first error is raised with
`.partial` holding every result that did arrive (None for each failed item).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, overload

import httpx

from . import wire
from .errors import SIEConnectionError, SIEError, SIEServerError, error_from_response
from .types import EncodeOptions, EncodeResult, ExtractResult, Item, ScoreResult

T = TypeVar("T")
R = TypeVar("R")
ItemLike = Item | str | Mapping[str, Any]
Options = EncodeOptions | Mapping[str, Any]
RETRY_CODES = frozenset({"MODEL_LOADING", "LORA_LOADING", "QUEUE_FULL", "RESOURCE_EXHAUSTED"})
_MAX_WAIT_S = 30.0  # one wait between attempts, whatever Retry-After says


def _to_item(x: ItemLike) -> Item:
    if isinstance(x, Item):
        return x
    if isinstance(x, str):
        return Item(text=x)
    if isinstance(x, Mapping) and (isinstance(x.get("text"), str) or x.get("images")):  # SIE's dicts
        return Item(text=x.get("text"), id=x.get("id"), images=x.get("images"))
    raise TypeError(f"expected Item, str or {{'text': ...}}, got {type(x).__name__}")


def _is_one(items: ItemLike | Sequence[ItemLike]) -> bool:
    return isinstance(items, (Item, str, Mapping))


def retryable(err: SIEServerError) -> bool:
    """Whether a refusal is transient: nothing ran, and the same request may succeed later."""
    return err.status == 429 or (err.status == 503 and (err.code in RETRY_CODES
                                                        or err.retry_after is not None))


class _Base:
    """Configuration, request building and response handling shared by both clients.

    base_url: server root; timeout: seconds per HTTP request; api_key: bearer token
    (default: env SIE_API_KEY); max_items_per_request: chunk size of `encode` lists;
    max_concurrency: chunks in flight at once per `encode` call; max_retries / retry_timeout:
    bounds on retrying transient refusals (0 retries: none); transport: optional custom
    httpx transport (sync or async to match the client).
    """

    _http_cls: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        base_url: str = "http://localhost:8080",
        *,
        timeout: float = 120.0,
        api_key: str | None = None,
        max_items_per_request: int = 256,
        max_concurrency: int = 4,
        max_retries: int = 8,
        retry_timeout: float = 300.0,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_items_per_request < 1 or max_concurrency < 1 or max_retries < 0:
            raise ValueError("max_items_per_request and max_concurrency must be >= 1, "
                             "max_retries >= 0")
        self.base_url = base_url
        self.max_items_per_request = max_items_per_request
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.retry_timeout = retry_timeout
        api_key = api_key or os.environ.get("SIE_API_KEY")
        headers = {"Content-Type": wire.MSGPACK, "Accept": wire.MSGPACK}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = self._http_cls(
            base_url=base_url,
            timeout=httpx.Timeout(timeout),
            headers=headers,
            transport=transport,  # type: ignore[arg-type]
        )

    def _encode_bodies(
        self,
        items: ItemLike | Sequence[ItemLike],
        output_types: Sequence[str] | None,
        options: Options | None,
        output_dtype: str | None,
        instruction: str | None,
        is_query: bool | None,
    ) -> tuple[bool, list[tuple[int, bytes]]]:
        """(single, [(n_items, body)]): one msgpack body per chunk of max_items_per_request."""
        single = _is_one(items)
        lst = [_to_item(items)] if single else [_to_item(x) for x in items]  # type: ignore[union-attr]
        if is_query is not None:
            options = {**(options or {}), "is_query": is_query}
        n = self.max_items_per_request
        chunks = [lst[i : i + n] for i in range(0, len(lst), n)]
        return single, [(len(c), wire.encode_request(c, output_types, options, output_dtype=output_dtype,
                                                      instruction=instruction)) for c in chunks]

    @staticmethod
    def _score_body(
        query: ItemLike, items: Sequence[ItemLike], options: Options | None, top_k: int | None, instruction: str | None
    ) -> bytes:
        return wire.score_request(_to_item(query), [_to_item(x) for x in items], options, top_k,
                                  instruction=instruction)

    @staticmethod
    def _extract_body(
        items: ItemLike | Sequence[ItemLike], labels: Sequence[str] | None,
        output_schema: Mapping[str, Any] | None, instruction: str | None,
        options: Mapping[str, Any] | None,
    ) -> tuple[bool, int, bytes]:
        """(single, number of items, msgpack body) of an extract call, sent as one request."""
        single = _is_one(items)
        lst = [_to_item(items)] if single else [_to_item(x) for x in items]  # type: ignore[union-attr]
        return single, len(lst), wire.extract_request(lst, labels, options, instruction=instruction,
                                                     output_schema=output_schema)

    @staticmethod
    def _extract_results(payload: Any, single: bool, n_items: int) -> ExtractResult | list[ExtractResult]:
        results = wire.decode_extract_response(payload)
        if len(results) != n_items:
            raise SIEError(f"server returned {len(results)} results for {n_items} items")
        return results[0] if single else results

    @staticmethod
    def _error(resp: httpx.Response) -> SIEServerError:
        return error_from_response(resp.status_code, resp.content, resp.headers.get("Retry-After"),
                                   resp.headers.get("X-SIE-Error-Code"))

    @classmethod
    def _payload(cls, resp: httpx.Response) -> Any:
        """Decode a response body, raising the typed exception for an error status."""
        if resp.status_code >= 400:
            raise cls._error(resp)
        try:
            return wire.unpack(resp.content, resp.headers.get("Content-Type"))
        except Exception as e:
            raise SIEError(f"undecodable response from {resp.request.url}: {e}") from e

    @classmethod
    def _encode_results(cls, payload: Any, n_items: int) -> list[EncodeResult]:
        results = wire.decode_encode_response(payload)
        if len(results) != n_items:
            raise SIEError(f"server returned {len(results)} results for {n_items} items")
        return results

    def _retry_delay(self, resp: httpx.Response, attempt: int, started: float) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None: answer `resp` as it is."""
        if resp.status_code not in (429, 503) or attempt >= self.max_retries:
            return None
        err = self._error(resp)
        if not retryable(err):
            return None
        left = self.retry_timeout - (time.monotonic() - started)
        wait = err.retry_after if err.retry_after is not None else min(0.25 * 2**attempt, 8.0)
        wait = min(wait, _MAX_WAIT_S) * random.uniform(1.0, 1.1)  # spread the retries of many clients
        return wait if wait <= left else None

    @staticmethod
    def _connection_error(e: httpx.TransportError, path: str) -> SIEConnectionError:
        return SIEConnectionError(f"{type(e).__name__} on {path}: {e}")

    @staticmethod
    def _join(parts: list[list[EncodeResult] | BaseException], sizes: list[int]) -> list[EncodeResult]:
        """Chunk results in order; if a chunk failed, its first error with `.partial` set."""
        failed = [p for p in parts if isinstance(p, BaseException)]
        if not failed:
            return [r for part in parts for r in part]  # type: ignore[union-attr]
        err = failed[0]
        if isinstance(err, SIEServerError):
            err.partial = [r for part, n in zip(parts, sizes)
                           for r in (part if isinstance(part, list) else [None] * n)]
            ok = sum(n for part, n in zip(parts, sizes) if isinstance(part, list))
            err.message += f" ({len(failed)} of {len(parts)} requests failed; {ok} of {sum(sizes)} items encoded, in .partial)"
        raise err


class SIEClient(_Base):
    """Blocking client. Thread-safe; use as a context manager or call `close()`.

    Lists longer than `max_items_per_request` are split into chunks that are sent in
    parallel from a short-lived thread pool of at most `max_concurrency` threads:
    `httpx.Client` is thread-safe and the threads only wait on the network, so this gives
    the same overlap as the async client without an event loop in the caller's thread.
    """

    _http_cls = httpx.Client
    _http: httpx.Client

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> httpx.Response:
        """One call, retrying transient refusals within the client's bounds."""
        started, attempt = time.monotonic(), 0
        while True:
            try:
                resp = self._http.request(method, path, content=body, headers=headers)
            except httpx.TransportError as e:
                raise self._connection_error(e, path) from e
            delay = self._retry_delay(resp, attempt, started)
            if delay is None:
                return resp
            time.sleep(delay)
            attempt += 1

    def _map(self, fn: Callable[[T], R], args: Sequence[T]) -> list[R | BaseException]:
        """fn over args (concurrently), each outcome a result or the exception it raised."""

        def outcome(a: T) -> R | BaseException:
            try:
                return fn(a)
            except Exception as e:  # noqa: BLE001 - reported per chunk by _join
                return e

        if len(args) <= 1 or self.max_concurrency == 1:
            return [outcome(a) for a in args]
        with ThreadPoolExecutor(min(self.max_concurrency, len(args)), thread_name_prefix="sie-sdk") as pool:
            return list(pool.map(outcome, args))

    @overload
    def encode(
        self, model: str, items: Item | str, output_types: Sequence[str] | None = ..., options: Options | None = ...,
        *, output_dtype: str | None = ..., instruction: str | None = ..., is_query: bool | None = ...,
    ) -> EncodeResult: ...
    @overload
    def encode(
        self, model: str, items: Sequence[ItemLike], output_types: Sequence[str] | None = ...,
        options: Options | None = ..., *, output_dtype: str | None = ..., instruction: str | None = ...,
        is_query: bool | None = ...,
    ) -> list[EncodeResult]: ...
    def encode(
        self,
        model: str,
        items: ItemLike | Sequence[ItemLike],
        output_types: Sequence[str] | None = None,
        options: Options | None = None,
        *,
        output_dtype: str | None = None,
        instruction: str | None = None,
        is_query: bool | None = None,
    ) -> EncodeResult | list[EncodeResult]:
        """Encode one item (returns one result) or a list (returns results in input order)."""
        single, bodies = self._encode_bodies(items, output_types, options, output_dtype, instruction, is_query)
        path = f"/v1/encode/{model}"

        def send(chunk: tuple[int, bytes]) -> list[EncodeResult]:
            return self._encode_results(self._payload(self._request("POST", path, chunk[1])), chunk[0])

        results = self._join(self._map(send, bodies), [n for n, _ in bodies])
        return results[0] if single else results

    def score(
        self,
        model: str,
        query: ItemLike,
        items: Sequence[ItemLike],
        options: Options | None = None,
        top_k: int | None = None,
        *,
        instruction: str | None = None,
    ) -> ScoreResult:
        """Score `items` against `query` in one request (never split: ranks span all items)."""
        body = self._score_body(query, items, options, top_k, instruction)
        return wire.decode_score_response(self._payload(self._request("POST", f"/v1/score/{model}", body)))

    def extract(
        self,
        model: str,
        items: ItemLike | Sequence[ItemLike],
        *,
        labels: Sequence[str] | None = None,
        output_schema: Mapping[str, Any] | None = None,
        instruction: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Any:
        """Entities (GLiNER) or classifications (zero-shot) of `labels` in each item, in one
        request; an ExtractResult for one item, a list for a list (as SIE's `extract`)."""
        single, n, body = self._extract_body(items, labels, output_schema, instruction, options)
        return self._extract_results(self._payload(self._request("POST", f"/v1/extract/{model}", body)),
                                     single, n)

    def list_models(self) -> list[dict[str, Any]]:
        """The server's models (`GET /v1/models`): SIE's ModelInfo fields and ours."""
        return self._payload(self._request("GET", "/v1/models", headers={"Accept": "application/json"}))["models"]

    models = list_models

    def get_model(self, model: str) -> dict[str, Any]:
        """One model's info (`GET /v1/models/{model}`), known before it is loaded."""
        return self._payload(self._request("GET", f"/v1/models/{model}", headers={"Accept": "application/json"}))

    def health(self) -> bool:
        """True when `GET /healthz` answers 200; False on any other status or no connection."""
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SIEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SIEAsyncClient(_Base):
    """Asyncio client with the same API as `SIEClient`; chunks of a long list are sent
    concurrently, at most `max_concurrency` in flight per `encode` call."""

    _http_cls = httpx.AsyncClient
    _http: httpx.AsyncClient

    async def _request(self, method: str, path: str, body: bytes | None = None,
                       headers: dict[str, str] | None = None) -> httpx.Response:
        """One call, retrying transient refusals within the client's bounds."""
        started, attempt = time.monotonic(), 0
        while True:
            try:
                resp = await self._http.request(method, path, content=body, headers=headers)
            except httpx.TransportError as e:
                raise self._connection_error(e, path) from e
            delay = self._retry_delay(resp, attempt, started)
            if delay is None:
                return resp
            await asyncio.sleep(delay)
            attempt += 1

    @overload
    async def encode(
        self, model: str, items: Item | str, output_types: Sequence[str] | None = ..., options: Options | None = ...,
        *, output_dtype: str | None = ..., instruction: str | None = ..., is_query: bool | None = ...,
    ) -> EncodeResult: ...
    @overload
    async def encode(
        self, model: str, items: Sequence[ItemLike], output_types: Sequence[str] | None = ...,
        options: Options | None = ..., *, output_dtype: str | None = ..., instruction: str | None = ...,
        is_query: bool | None = ...,
    ) -> list[EncodeResult]: ...
    async def encode(
        self,
        model: str,
        items: ItemLike | Sequence[ItemLike],
        output_types: Sequence[str] | None = None,
        options: Options | None = None,
        *,
        output_dtype: str | None = None,
        instruction: str | None = None,
        is_query: bool | None = None,
    ) -> EncodeResult | list[EncodeResult]:
        """Encode one item (returns one result) or a list (returns results in input order)."""
        single, bodies = self._encode_bodies(items, output_types, options, output_dtype, instruction, is_query)
        path = f"/v1/encode/{model}"
        sem = asyncio.Semaphore(self.max_concurrency)

        async def send(n_items: int, body: bytes) -> list[EncodeResult]:
            async with sem:
                resp = await self._request("POST", path, body)
            return self._encode_results(self._payload(resp), n_items)

        parts = await asyncio.gather(*(send(n, b) for n, b in bodies), return_exceptions=True)
        results = self._join(list(parts), [n for n, _ in bodies])
        return results[0] if single else results

    async def score(
        self,
        model: str,
        query: ItemLike,
        items: Sequence[ItemLike],
        options: Options | None = None,
        top_k: int | None = None,
        *,
        instruction: str | None = None,
    ) -> ScoreResult:
        """Score `items` against `query` in one request (never split: ranks span all items)."""
        body = self._score_body(query, items, options, top_k, instruction)
        return wire.decode_score_response(self._payload(await self._request("POST", f"/v1/score/{model}", body)))

    async def extract(
        self,
        model: str,
        items: ItemLike | Sequence[ItemLike],
        *,
        labels: Sequence[str] | None = None,
        output_schema: Mapping[str, Any] | None = None,
        instruction: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Any:
        """Entities (GLiNER) or classifications (zero-shot) of `labels` in each item, in one
        request; an ExtractResult for one item, a list for a list (as SIE's `extract`)."""
        single, n, body = self._extract_body(items, labels, output_schema, instruction, options)
        return self._extract_results(self._payload(await self._request("POST", f"/v1/extract/{model}", body)),
                                     single, n)

    async def list_models(self) -> list[dict[str, Any]]:
        """The server's models (`GET /v1/models`): SIE's ModelInfo fields and ours."""
        resp = await self._request("GET", "/v1/models", headers={"Accept": "application/json"})
        return self._payload(resp)["models"]

    models = list_models

    async def get_model(self, model: str) -> dict[str, Any]:
        """One model's info (`GET /v1/models/{model}`), known before it is loaded."""
        return self._payload(await self._request("GET", f"/v1/models/{model}", headers={"Accept": "application/json"}))

    async def health(self) -> bool:
        """True when `GET /healthz` answers 200; False on any other status or no connection."""
        try:
            return (await self._http.get("/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> SIEAsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
