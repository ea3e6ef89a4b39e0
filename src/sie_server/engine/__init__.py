"""The engine: model registry and scheduler, usable in-process without HTTP."""

from .engine import Engine, EncodeOptions, ItemResult

__all__ = ["Engine", "EncodeOptions", "ItemResult"]
