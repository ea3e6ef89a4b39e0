"""ASGI middleware: request ids, API keys, request metrics and the last word on unexpected
errors, around every route."""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import time

from starlette.requests import Request

from ..config import check_api_keys
from ..errors import InternalError, SIEError, Unauthorized
from ..logs import request_id
from ..metrics import Metrics
from .envelopes import renderer
from .wire import SIE_PROTOCOL_VERSION

log = logging.getLogger("sie_server.access")

# Reachable without an API key: the probes, and the page at `/` with its files (it holds
# nothing secret; it asks for a key and sends it on the routes that need one).
OPEN_PATHS = ("/healthz", "/readyz", "/livez", "/health", "/ui/")
OPEN_EXACT = ("/",)
UNAUTHORIZED_MESSAGE = "missing or invalid API key"
# Generated request ids: a random per-process prefix and a counter. Unique without a syscall
# per request (uuid4 reads os.urandom, which gives up the GIL to the compute thread).
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()
_VERSION = SIE_PROTOCOL_VERSION.encode()


def is_open(method: str, path: str) -> bool:
    """Whether the request is served without an API key (only reads: `POST /` is TEI's
    embed route, which needs one)."""
    return method in ("GET", "HEAD") and (path in OPEN_EXACT or path.startswith(OPEN_PATHS))


def route_of(path: str) -> str:
    """A low-cardinality route label."""
    if path.startswith("/v1/models/") and "/adapters/" in path:
        return "adapters"
    if path == "/" or path.startswith("/ui/"):
        return "page"
    for prefix, name in (("/v1/encode/", "encode"), ("/v1/score/", "score"),
                         ("/v1/embeddings", "embeddings"), ("/v1/models", "models"),
                         ("/v1/rerank", "rerank"), ("/v2/rerank", "rerank"),
                         ("/v1/tokens/", "tokens"), ("/status", "status"),
                         ("/metrics", "metrics"), ("/healthz", "health"), ("/readyz", "health"),
                         ("/livez", "health"), ("/health", "health")):
        if path.startswith(prefix):
            return name
    return "other"


class ServerMiddleware:
    """Echoes or creates X-Request-ID, checks bearer tokens (the matched key's index becomes
    the request's tenant, `scope["state"]["tenant"]`, for fair scheduling), counts and times
    requests, and counts error responses by their code (X-SIE-Error-Code; the message from
    `scope["state"]["error"]`, set where the error is answered). An exception no route
    handled is logged here, once, with the request id, and answered 500; it does not reach
    the ASGI server (which would log it a second time)."""

    def __init__(self, app, *, api_keys: list[str], metrics: Metrics,
                 infinity_prefix: str = "") -> None:
        check_api_keys(api_keys)
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.metrics = metrics
        self.infinity_prefix = infinity_prefix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"
        token = request_id.set(rid)
        route = route_of(scope["path"])
        started = time.perf_counter()
        status = 500
        code = b""

        started_response = False

        async def send_with_id(message) -> None:
            nonlocal status, started_response, code
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                code = next((v for k, v in message.get("headers", [])
                             if k.lower() == b"x-sie-error-code"), b"")
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode()),
                                      (b"x-sie-server-version", _VERSION)]
            await send(message)

        try:
            tenant = self._tenant(headers) if self.keys else None
            if self.keys and tenant is None and not is_open(scope["method"], scope["path"]):
                scope.setdefault("state", {})["error"] = UNAUTHORIZED_MESSAGE
                await self._refuse(scope, receive, send_with_id, Unauthorized(UNAUTHORIZED_MESSAGE),
                                   {"WWW-Authenticate": "Bearer"})
            else:
                scope.setdefault("state", {})["tenant"] = tenant
                await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - the one place unexpected errors are logged
            log.exception("unhandled error on %s", scope["path"])
            status = 500
            if not started_response:
                message = scope.setdefault("state", {})["error"] = \
                    f"internal error: {type(exc).__name__}"
                await self._refuse(scope, receive, send_with_id, InternalError(message))
        finally:
            state = scope.get("state", {})
            model = state.get("model", "")
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(model, route, str(status)).inc()
            if code:
                self.metrics.error(code.decode("latin-1"), status, route, model,
                                   state.get("error", ""))
            self.metrics.request_seconds.labels(route).observe(seconds)
            if route not in ("health", "status"):  # probes and the page's polling
                log.info("%s %s %d", scope["method"], scope["path"], status, extra={"fields": {
                    "status": status, "model": model, "ms": round(seconds * 1000, 2)}})
            request_id.reset(token)

    def _tenant(self, headers: dict[bytes, bytes]) -> str | None:
        """The index of the bearer token's key ("0", "1", ...), or None if none matches."""
        auth = headers.get(b"authorization", b"")
        if not auth.lower().startswith(b"bearer "):
            return None
        given = auth[7:].strip()
        # compare against every key, always, in constant time per key
        matches = [hmac.compare_digest(given, key) for key in self.keys]
        return str(matches.index(True)) if any(matches) else None

    async def _refuse(self, scope, receive, send, err: SIEError,
                      headers: dict[str, str] | None = None) -> None:
        """`err` in the envelope of the protocol the path belongs to (api/envelopes.py)."""
        response = renderer(scope["path"], self.infinity_prefix)(Request(scope), err)
        response.headers.update(headers or {})  # every envelope carries X-SIE-Error-Code
        await response(scope, receive, send)
