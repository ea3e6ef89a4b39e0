"""Synchronous and asynchronous HTTP clients of the SIE server.

Neither client retries anything: every failure surfaces as an `SIEError` subclass
(`OverloadedError.retry_after` carries the server's hint for callers that want to retry).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, overload

import httpx

from . import wire
from .errors import SIEConnectionError, SIEError, error_from_response
from .types import EncodeOptions, EncodeResult, Item, ScoreResult

T = TypeVar("T")
R = TypeVar("R")
ItemLike = Item | str
Options = EncodeOptions | Mapping[str, Any]


def _to_item(x: ItemLike) -> Item:
    if isinstance(x, Item):
        return x
    if isinstance(x, str):
        return Item(text=x)
    raise TypeError(f"expected Item or str, got {type(x).__name__}")


class _Base:
    """Configuration, request building and response handling shared by both clients.

    base_url: server root; timeout: seconds per HTTP request; api_key: bearer token
    (default: env SIE_API_KEY); max_items_per_request: chunk size of `encode` lists;
    max_concurrency: chunks in flight at once per `encode` call; transport: optional
    custom httpx transport (sync or async to match the client).
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
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_items_per_request < 1 or max_concurrency < 1:
            raise ValueError("max_items_per_request and max_concurrency must be >= 1")
        self.base_url = base_url
        self.max_items_per_request = max_items_per_request
        self.max_concurrency = max_concurrency
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
        self, items: ItemLike | Sequence[ItemLike], output_types: Sequence[str] | None, options: Options | None
    ) -> tuple[bool, list[tuple[int, bytes]]]:
        """Return (single, [(n_items, body)]): one msgpack body per chunk of max_items_per_request."""
        single = isinstance(items, (Item, str))
        lst = [_to_item(items)] if isinstance(items, (Item, str)) else [_to_item(x) for x in items]
        n = self.max_items_per_request
        chunks = [lst[i : i + n] for i in range(0, len(lst), n)]
        return single, [(len(c), wire.encode_request(c, output_types, options)) for c in chunks]

    @staticmethod
    def _score_body(query: ItemLike, items: Sequence[ItemLike], options: Options | None, top_k: int | None) -> bytes:
        return wire.score_request(_to_item(query), [_to_item(x) for x in items], options, top_k)

    @staticmethod
    def _payload(resp: httpx.Response) -> Any:
        """Decode a response body, raising the typed exception for an error status."""
        if resp.status_code >= 400:
            raise error_from_response(resp.status_code, resp.content, resp.headers.get("Retry-After"))
        try:
            return wire.unpack(resp.content, resp.headers.get("Content-Type"))
        except Exception as e:
            raise SIEError(f"undecodable response from {resp.request.url}: {e}") from e

    @classmethod
    def _encode_results(cls, resp: httpx.Response, n_items: int) -> list[EncodeResult]:
        results = wire.decode_encode_response(cls._payload(resp))
        if len(results) != n_items:
            raise SIEError(f"server returned {len(results)} results for {n_items} items")
        return results

    @staticmethod
    def _connection_error(e: httpx.TransportError, path: str) -> SIEConnectionError:
        return SIEConnectionError(f"{type(e).__name__} on {path}: {e}")


class SIEClient(_Base):
    """Blocking client. Thread-safe; use as a context manager or call `close()`.

    Lists longer than `max_items_per_request` are split into chunks that are sent in
    parallel from a short-lived thread pool of at most `max_concurrency` threads:
    `httpx.Client` is thread-safe and the threads only wait on the network, so this gives
    the same overlap as the async client without an event loop in the caller's thread.
    """

    _http_cls = httpx.Client
    _http: httpx.Client

    def _request(self, method: str, path: str, body: bytes | None = None) -> httpx.Response:
        try:
            return self._http.request(method, path, content=body)
        except httpx.TransportError as e:
            raise self._connection_error(e, path) from e

    def _map(self, fn: Callable[[T], R], args: Sequence[T]) -> list[R]:
        if len(args) <= 1 or self.max_concurrency == 1:
            return [fn(a) for a in args]
        pool = ThreadPoolExecutor(min(self.max_concurrency, len(args)), thread_name_prefix="sie-sdk")
        try:
            return list(pool.map(fn, args))
        finally:
            pool.shutdown(cancel_futures=True)

    @overload
    def encode(
        self, model: str, items: ItemLike, output_types: Sequence[str] | None = ..., options: Options | None = ...
    ) -> EncodeResult: ...
    @overload
    def encode(
        self,
        model: str,
        items: Sequence[ItemLike],
        output_types: Sequence[str] | None = ...,
        options: Options | None = ...,
    ) -> list[EncodeResult]: ...
    def encode(
        self,
        model: str,
        items: ItemLike | Sequence[ItemLike],
        output_types: Sequence[str] | None = None,
        options: Options | None = None,
    ) -> EncodeResult | list[EncodeResult]:
        """Encode one item (returns one result) or a list (returns results in input order)."""
        single, bodies = self._encode_bodies(items, output_types, options)
        path = f"/v1/encode/{model}"

        def send(chunk: tuple[int, bytes]) -> list[EncodeResult]:
            return self._encode_results(self._request("POST", path, chunk[1]), chunk[0])

        results = [r for part in self._map(send, bodies) for r in part]
        return results[0] if single else results

    def score(
        self,
        model: str,
        query: ItemLike,
        items: Sequence[ItemLike],
        options: Options | None = None,
        top_k: int | None = None,
    ) -> ScoreResult:
        """Score `items` against `query` in one request (never split: ranks span all items)."""
        body = self._score_body(query, items, options, top_k)
        return wire.decode_score_response(self._payload(self._request("POST", f"/v1/score/{model}", body)))

    def models(self) -> list[dict[str, Any]]:
        """The server's models (`GET /v1/models`)."""
        return self._payload(self._request("GET", "/v1/models"))["models"]

    def health(self) -> bool:
        """True when `GET /healthz` answers 200; False on any other status or no connection."""
        try:
            return self._request("GET", "/healthz").status_code == 200
        except SIEConnectionError:
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

    async def _request(self, method: str, path: str, body: bytes | None = None) -> httpx.Response:
        try:
            return await self._http.request(method, path, content=body)
        except httpx.TransportError as e:
            raise self._connection_error(e, path) from e

    @overload
    async def encode(
        self, model: str, items: ItemLike, output_types: Sequence[str] | None = ..., options: Options | None = ...
    ) -> EncodeResult: ...
    @overload
    async def encode(
        self,
        model: str,
        items: Sequence[ItemLike],
        output_types: Sequence[str] | None = ...,
        options: Options | None = ...,
    ) -> list[EncodeResult]: ...
    async def encode(
        self,
        model: str,
        items: ItemLike | Sequence[ItemLike],
        output_types: Sequence[str] | None = None,
        options: Options | None = None,
    ) -> EncodeResult | list[EncodeResult]:
        """Encode one item (returns one result) or a list (returns results in input order)."""
        single, bodies = self._encode_bodies(items, output_types, options)
        path = f"/v1/encode/{model}"
        sem = asyncio.Semaphore(self.max_concurrency)

        async def send(n_items: int, body: bytes) -> list[EncodeResult]:
            async with sem:
                return self._encode_results(await self._request("POST", path, body), n_items)

        tasks = [asyncio.ensure_future(send(n, b)) for n, b in bodies]
        try:
            parts = await asyncio.gather(*tasks)
        finally:
            for t in tasks:  # on the first failure, stop the other chunks
                t.cancel()
        results = [r for part in parts for r in part]
        return results[0] if single else results

    async def score(
        self,
        model: str,
        query: ItemLike,
        items: Sequence[ItemLike],
        options: Options | None = None,
        top_k: int | None = None,
    ) -> ScoreResult:
        """Score `items` against `query` in one request (never split: ranks span all items)."""
        body = self._score_body(query, items, options, top_k)
        return wire.decode_score_response(self._payload(await self._request("POST", f"/v1/score/{model}", body)))

    async def models(self) -> list[dict[str, Any]]:
        """The server's models (`GET /v1/models`)."""
        return self._payload(await self._request("GET", "/v1/models"))["models"]

    async def health(self) -> bool:
        """True when `GET /healthz` answers 200; False on any other status or no connection."""
        try:
            return (await self._request("GET", "/healthz")).status_code == 200
        except SIEConnectionError:
            return False

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> SIEAsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
