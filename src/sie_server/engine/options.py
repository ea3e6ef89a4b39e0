"""Type-checking of a request's options dict against a table of option kinds."""

from __future__ import annotations

import math
from typing import Any

from ..errors import InvalidRequest, shown


def check_options(options: Any, kinds: dict[str, type | tuple[type, ...]], field: str) -> dict:
    """`options` (None = {}) with every key known and every non-None value of its kind
    (bools are not numbers); a positive `timeout_s`. Errors name `field.key`."""
    options = options or {}
    if not isinstance(options, dict):
        raise InvalidRequest(f"{field} must be an object")
    for key, value in options.items():
        if key not in kinds:
            raise InvalidRequest(f"{field}.{shown(key)} is not a known option "
                                 f"(known: {', '.join(kinds)})")
        expected = kinds[key]
        if value is not None and (not isinstance(value, expected) or
                                  (expected != bool and isinstance(value, bool))):
            raise InvalidRequest(f"{field}.{key} has the wrong type")
    timeout = options.get("timeout_s")
    if timeout is not None and not _positive_seconds(timeout):
        raise InvalidRequest(f"{field}.timeout_s must be a finite number of seconds above 0")
    return options


def _positive_seconds(value: int | float) -> bool:
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:  # an int too large for a float
        return False


def check_lengths(options: dict, field: str) -> None:
    """SIE's per-request token limits (`max_seq_length`, `query_max_length`), if given, are
    positive."""
    for key in ("max_seq_length", "query_max_length"):
        if options.get(key) is not None and options[key] < 1:
            raise InvalidRequest(f"{field}.{key} must be a positive number of tokens")
