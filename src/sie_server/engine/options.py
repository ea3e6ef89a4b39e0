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


LENGTH_OPTIONS = ("max_seq_length", "query_max_length")  # SIE's per-request token limits


def check_lengths(options: Any, field: str) -> Any:
    """`options` with SIE's per-request token limits (`max_seq_length`, `query_max_length`)
    as ints: SIE's adapters take `int(value)`, so "128" and 128.0 are 128 there and here. A
    value that is not a positive whole number is a 400 naming it (SIE falls back to the
    model's limit silently). Anything but a dict is returned for check_options to refuse."""
    if not isinstance(options, dict):
        return options
    options = dict(options)
    for key in LENGTH_OPTIONS:
        value = options.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidRequest(f"{field}.{key} must be a positive whole number of tokens")
        options[key] = value
    return options
