"""Type-checking of a request's options dict against a table of option kinds."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequest


def check_options(options: Any, kinds: dict[str, type | tuple[type, ...]], field: str) -> dict:
    """`options` (None = {}) with every key known and every non-None value of its kind
    (bools are not numbers); a positive `timeout_s`. Errors name `field.key`."""
    options = options or {}
    if not isinstance(options, dict):
        raise InvalidRequest(f"{field} must be an object")
    for key, value in options.items():
        if key not in kinds:
            raise InvalidRequest(f"{field}.{key} is not a known option "
                                 f"(known: {', '.join(kinds)})")
        expected = kinds[key]
        if value is not None and (not isinstance(value, expected) or
                                  (expected != bool and isinstance(value, bool))):
            raise InvalidRequest(f"{field}.{key} has the wrong type")
    if options.get("timeout_s") is not None and options["timeout_s"] <= 0:
        raise InvalidRequest(f"{field}.timeout_s must be positive")
    return options
