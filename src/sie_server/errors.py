"""One error hierarchy for the engine; the API maps each to an HTTP status in one place."""

from __future__ import annotations


class SIEError(Exception):
    """An error with a stable code and a message meant for the client."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidRequest(SIEError):
    status, code = 400, "invalid_request"


class InputTooLong(SIEError):
    status, code = 400, "input_too_long"


class Unauthorized(SIEError):
    status, code = 401, "unauthorized"


class ModelNotFound(SIEError):
    status, code = 404, "model_not_found"


class AdapterNotFound(SIEError):
    status, code = 404, "adapter_not_found"


class BodyTooLarge(SIEError):
    status, code = 413, "body_too_large"


class InvalidAdapter(SIEError):
    status, code = 422, "invalid_adapter"


class Overloaded(SIEError):
    status, code = 429, "overloaded"


class ModelUnavailable(SIEError):
    status, code = 503, "model_unavailable"


class AdapterLoading(SIEError):
    """The adapter's first load outlasted the wait (adapter_load_timeout_s); it goes on."""

    status, code = 503, "adapter_loading"


class DeadlineExceeded(SIEError):
    status, code = 504, "deadline_exceeded"


class InternalError(SIEError):
    status, code = 500, "internal"
