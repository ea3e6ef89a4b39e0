"""Exceptions raised by the SIE SDK, and the mapping from HTTP error responses to them.

Error bodies are SIE's `{"detail": {"code", "message", ...}}` (also accepted: OpenAI's and
older `{"error": {...}}`); the `X-SIE-Error-Code` header, when present, names the code.
The code picks the exception class; the status decides where no code is known.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack


class SIEError(Exception):
    """Base class of every SDK error."""


class SIEConnectionError(SIEError):
    """The server could not be reached, or the request timed out."""


class SIEServerError(SIEError):
    """The server answered with an error status; `code` is SIE's error code, `retry_after`
    the server's Retry-After hint in seconds (None without one), `detail` the whole error
    object. For a list split into several requests, `partial` holds the results of the
    requests that succeeded (None in place of each failed item)."""

    default_code = "HTTP_ERROR"

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None,
                 detail: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.detail = detail or {}
        self.partial: list[Any] | None = None


class InvalidRequestError(SIEServerError):
    """400: malformed request, unknown option/output type."""

    default_code = "INVALID_INPUT"


class InputTooLongError(InvalidRequestError):
    """400 INPUT_TOO_LONG: an input over the model's limit with `truncate: false`."""

    default_code = "INPUT_TOO_LONG"


class UnauthorizedError(SIEServerError):
    """401: missing or wrong API key."""

    default_code = "UNAUTHORIZED"


class ModelNotFoundError(SIEServerError):
    """404: unknown model id."""

    default_code = "MODEL_NOT_FOUND"


class AdapterNotFoundError(SIEServerError):
    """404 LORA_NOT_FOUND: the `lora_id` is not available to the server."""

    default_code = "LORA_NOT_FOUND"


class DeadlineExceededError(SIEServerError):
    """408: the request's own deadline (`timeout_s`) passed; not retried."""

    default_code = "DEADLINE_EXCEEDED"


class PayloadTooLargeError(SIEServerError):
    """413: request body over the server's limit; lower `max_items_per_request`."""

    default_code = "INPUT_TOO_LONG"


class OverloadedError(SIEServerError):
    """429, or 503 QUEUE_FULL: the model's queue is full; retried, then raised."""

    default_code = "QUEUE_FULL"


class ModelUnavailableError(SIEServerError):
    """503: the model cannot serve now."""

    default_code = "MODEL_NOT_LOADED"


class ModelLoadingError(ModelUnavailableError):
    """503 MODEL_LOADING: still loading after the client's retries."""

    default_code = "MODEL_LOADING"


class ModelLoadFailedError(ModelUnavailableError):
    """502 MODEL_LOAD_FAILED: the model's load failed; never retried."""

    default_code = "MODEL_LOAD_FAILED"


class AdapterLoadingError(ModelUnavailableError):
    """503 LORA_LOADING: the adapter was still loading after the client's retries."""

    default_code = "LORA_LOADING"


class ResourceExhaustedError(ModelUnavailableError):
    """503 RESOURCE_EXHAUSTED: no memory for it now."""

    default_code = "RESOURCE_EXHAUSTED"


class GatewayTimeoutError(SIEServerError):
    """504: a proxy in front of the server timed out."""

    default_code = "GATEWAY_TIMEOUT"


class InternalServerError(SIEServerError):
    """Any other 5xx."""

    default_code = "INTERNAL_ERROR"


_BY_CODE: dict[str, type[SIEServerError]] = {
    "INVALID_INPUT": InvalidRequestError,
    "UNAUTHORIZED": UnauthorizedError,
    "MODEL_NOT_FOUND": ModelNotFoundError,
    "LORA_NOT_FOUND": AdapterNotFoundError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "QUEUE_FULL": OverloadedError,
    "RATE_LIMIT": OverloadedError,
    "MODEL_NOT_LOADED": ModelUnavailableError,
    "MODEL_LOADING": ModelLoadingError,
    "MODEL_LOAD_FAILED": ModelLoadFailedError,
    "LORA_LOADING": AdapterLoadingError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
}
_BY_STATUS: dict[int, type[SIEServerError]] = {
    400: InvalidRequestError,
    401: UnauthorizedError,
    404: ModelNotFoundError,
    408: DeadlineExceededError,
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


def _parse_body(body: bytes | str | dict[str, Any]) -> tuple[str | None, str, dict[str, Any]]:
    """(code, message, error object) from an error body in JSON, msgpack or plain text."""
    raw = body.encode() if isinstance(body, str) else body
    data = body if isinstance(body, dict) else _load(raw)
    if isinstance(data, dict):
        err = data.get("detail", data.get("error"))
        if isinstance(err, dict):
            code = err.get("code")
            return (str(code) if code else None), str(err.get("message", "")), err
        if isinstance(err, str):
            return None, err, {}
    text = str(body) if isinstance(body, dict) else raw.decode("utf-8", "replace")
    return None, text.strip()[:1000], {}


def _seconds(value: str | float | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def error_from_response(
    status: int,
    body: bytes | str | dict[str, Any],
    retry_after: str | float | None = None,
    code_header: str | None = None,
) -> SIEServerError:
    """Map an error status, its body (JSON, msgpack, or anything else), the `Retry-After`
    and `X-SIE-Error-Code` headers to a typed exception."""
    code, message, detail = _parse_body(body)
    code = code_header or code
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status) or (
        InternalServerError if status >= 500 else SIEServerError)
    if code == "INPUT_TOO_LONG":
        cls = InputTooLongError if status == 400 else PayloadTooLargeError
    return cls(status, code or cls.default_code, message or f"HTTP {status}",
               _seconds(retry_after), detail)
