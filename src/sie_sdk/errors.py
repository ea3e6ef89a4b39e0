"""Exceptions raised by the SIE SDK, and the mapping from HTTP error responses to them."""

from __future__ import annotations

import json
from typing import Any

import msgpack


class SIEError(Exception):
    """Base class of every SDK error."""


class SIEConnectionError(SIEError):
    """The server could not be reached, or the request timed out."""


class SIEServerError(SIEError):
    """The server answered with an error status and body `{"error": {"code", "message"}}`;
    `retry_after` holds the server's Retry-After hint in seconds (429, 503), else None."""

    default_code = "http_error"

    def __init__(self, status: int, code: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class InvalidRequestError(SIEServerError):
    """400: malformed request, unknown option/output type, or input too long."""

    default_code = "invalid_request"


class UnauthorizedError(SIEServerError):
    """401: missing or wrong API key."""

    default_code = "unauthorized"


class ModelNotFoundError(SIEServerError):
    """404: unknown model id."""

    default_code = "model_not_found"


class PayloadTooLargeError(SIEServerError):
    """413: request body over the server's limit; lower `max_items_per_request`."""

    default_code = "body_too_large"


class OverloadedError(SIEServerError):
    """429: the model's queue is full; `retry_after` holds the server's hint in seconds."""

    default_code = "overloaded"


class ModelUnavailableError(SIEServerError):
    """503: the model is registered but cannot be loaded."""

    default_code = "model_unavailable"


class GatewayTimeoutError(SIEServerError):
    """504: the server (or a proxy in front of it) timed out."""

    default_code = "gateway_timeout"


class InternalServerError(SIEServerError):
    """Any other 5xx."""

    default_code = "internal"


_BY_STATUS: dict[int, type[SIEServerError]] = {
    400: InvalidRequestError,
    401: UnauthorizedError,
    404: ModelNotFoundError,
    413: PayloadTooLargeError,
    429: OverloadedError,
    503: ModelUnavailableError,
    504: GatewayTimeoutError,
}


def _load(raw: bytes) -> Any:
    """Decode a body as JSON, else msgpack, else return None."""
    for load in (json.loads, lambda b: msgpack.unpackb(b, raw=False)):
        try:
            return load(raw)
        except Exception:
            continue
    return None


def _parse_body(body: bytes | str | dict[str, Any]) -> tuple[str | None, str]:
    """Return (code, message) from an error body in JSON, msgpack or plain text."""
    raw = body.encode() if isinstance(body, str) else body
    data = body if isinstance(body, dict) else _load(raw)
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return (str(err["code"]) if err.get("code") else None), str(err.get("message", ""))
    text = str(body) if isinstance(body, dict) else raw.decode("utf-8", "replace")
    return None, text.strip()[:1000]


def _seconds(value: str | float | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def error_from_response(
    status: int, body: bytes | str | dict[str, Any], retry_after: str | float | None = None
) -> SIEServerError:
    """Map an error status, its body (JSON, msgpack, or anything else) and the
    `Retry-After` header to a typed exception."""
    cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else SIEServerError)
    code, message = _parse_body(body)
    code, message = code or cls.default_code, message or f"HTTP {status}"
    return cls(status, code, message, _seconds(retry_after))
