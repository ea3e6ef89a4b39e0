"""One error hierarchy for the engine; the API maps each to an HTTP status in one place.

Codes and statuses are SIE's (`sie-server` 0.10.1 `ErrorCode`), so the public `sie-sdk`
retries exactly what it should: 503 MODEL_LOADING / LORA_LOADING / QUEUE_FULL /
RESOURCE_EXHAUSTED with Retry-After; 502 MODEL_LOAD_FAILED and every 4xx never.
"""

from __future__ import annotations

from typing import Any


def shown(key: object) -> str:
    """A client-chosen name (a field or option key) as an error message may echo it: a string
    cut to 64 characters, anything else by its type."""
    return key[:64] if isinstance(key, str) else type(key).__name__


class SIEError(Exception):
    """An error with a stable code and a message meant for the client; `detail` holds extra
    fields of the error body (MODEL_LOAD_FAILED's error_class, attempts, permanent)."""

    status = 500
    code = "INTERNAL_ERROR"

    def __init__(self, message: str, *, retry_after: float | None = None,
                 detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.detail = detail or {}


class InvalidRequest(SIEError):
    status, code = 400, "INVALID_INPUT"


class InputTooLong(SIEError):
    status, code = 400, "INPUT_TOO_LONG"


class Unauthorized(SIEError):
    status, code = 401, "UNAUTHORIZED"


class ModelNotFound(SIEError):
    status, code = 404, "MODEL_NOT_FOUND"


class AdapterNotFound(SIEError):
    status, code = 404, "LORA_NOT_FOUND"


class DeadlineExceeded(SIEError):
    """The client's own deadline passed: 408, which no SDK retries (SIE's SDK retries 504)."""

    status, code = 408, "DEADLINE_EXCEEDED"


class BodyTooLarge(SIEError):
    """SIE answers an over-limit body with 413 and the INPUT_TOO_LONG code."""

    status, code = 413, "INPUT_TOO_LONG"


class WordTooLong(SIEError):
    """A text with one word too long to cut exactly without tokenizing all of it (see
    runtime/tokenizer.py, point 5): 413 with the INPUT_TOO_LONG code."""

    status, code = 413, "INPUT_TOO_LONG"


class InvalidAdapter(SIEError):
    status, code = 422, "INVALID_ADAPTER"


class NotServed(SIEError):
    """A route of SIE's API (or OpenAI's) for a feature this server does not have."""

    status, code = 501, "NOT_IMPLEMENTED"


class ModelUnavailable(SIEError):
    """The model cannot serve now (unloaded, shutting down); retry."""

    status, code = 503, "MODEL_NOT_LOADED"


class ModelLoading(ModelUnavailable):
    """The model is loading; the SDKs wait and retry (Retry-After)."""

    code = "MODEL_LOADING"


class ModelLoadFailed(ModelUnavailable):
    """The model's last load failed; retrying before the cool-down ends cannot help."""

    status, code = 502, "MODEL_LOAD_FAILED"


class ResourceExhausted(ModelUnavailable):
    """No memory for it now (budget held by busy models, or device OOM); retry later."""

    code = "RESOURCE_EXHAUSTED"


class Overloaded(SIEError):
    """The model's queue is full (SIE: 503 QUEUE_FULL with Retry-After)."""

    status, code = 503, "QUEUE_FULL"


class AdapterLoading(SIEError):
    """The adapter's first load outlasted the wait (adapter_load_timeout_s); it goes on."""

    status, code = 503, "LORA_LOADING"


class InternalError(SIEError):
    status, code = 500, "INTERNAL_ERROR"
