"""ASGI middleware: request ids, API keys and request metrics, around every route."""

from __future__ import annotations

import hmac
import json
import logging
import time
import itertools
import os

from ..logs import request_id
from ..metrics import Metrics
from .wire import SIE_PROTOCOL_VERSION

log = logging.getLogger("sie_server.access")

OPEN_PATHS = ("/healthz", "/readyz", "/livez", "/health")  # reachable without an API key
# Generated request ids: a random per-process prefix and a counter. Unique without a syscall
# per request (uuid4 reads os.urandom, which gives up the GIL to the compute thread).
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()
_VERSION = SIE_PROTOCOL_VERSION.encode()


def route_of(path: str) -> str:
    """A low-cardinality route label."""
    if path.startswith("/v1/models/") and "/adapters/" in path:
        return "adapters"
    for prefix, name in (("/v1/encode/", "encode"), ("/v1/score/", "score"),
                         ("/v1/embeddings", "embeddings"), ("/v1/models", "models"),
                         ("/metrics", "metrics"), ("/healthz", "health"), ("/readyz", "health"),
                         ("/livez", "health"), ("/health", "health")):
        if path.startswith(prefix):
            return name
    return "other"


class ServerMiddleware:
    """Echoes or creates X-Request-ID, checks bearer tokens, counts and times requests."""

    def __init__(self, app, *, api_keys: list[str], metrics: Metrics) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"
        token = request_id.set(rid)
        route = route_of(scope["path"])
        started = time.perf_counter()
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode()),
                                      (b"x-sie-server-version", _VERSION)]
            await send(message)

        try:
            if self.keys and not scope["path"].startswith(OPEN_PATHS) and not self._authorized(headers):
                await self._unauthorized(send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            model = scope.get("state", {}).get("model", "")
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(model, route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(seconds)
            if route != "health":
                log.info("%s %s %d", scope["method"], scope["path"], status, extra={"fields": {
                    "status": status, "model": model, "ms": round(seconds * 1000, 2)}})
            request_id.reset(token)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"")
        if not auth.lower().startswith(b"bearer "):
            return False
        given = auth[7:].strip()
        # compare against every key, always, in constant time per key
        return any([hmac.compare_digest(given, key) for key in self.keys])

    @staticmethod
    async def _unauthorized(send) -> None:
        body = json.dumps({"detail": {"code": "UNAUTHORIZED",
                                      "message": "missing or invalid API key"}}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
            (b"x-sie-error-code", b"UNAUTHORIZED")]})
        await send({"type": "http.response.body", "body": body})
