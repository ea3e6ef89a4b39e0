"""Python SDK of the SIE embedding server (no torch needed)."""

from .client import SIEAsyncClient, SIEClient
from .errors import (
    GatewayTimeoutError,
    InternalServerError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    OverloadedError,
    PayloadTooLargeError,
    SIEConnectionError,
    SIEError,
    SIEServerError,
    UnauthorizedError,
    error_from_response,
)
from .types import EncodeOptions, EncodeResult, Item, ScoreEntry, ScoreResult, SparseVector

__all__ = [
    "EncodeOptions",
    "EncodeResult",
    "GatewayTimeoutError",
    "InternalServerError",
    "InvalidRequestError",
    "Item",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "OverloadedError",
    "PayloadTooLargeError",
    "SIEAsyncClient",
    "SIEClient",
    "SIEConnectionError",
    "SIEError",
    "SIEServerError",
    "ScoreEntry",
    "ScoreResult",
    "SparseVector",
    "UnauthorizedError",
    "error_from_response",
]
