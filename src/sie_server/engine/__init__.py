"""The engine: model registry and scheduler, usable in-process without HTTP."""

from .engine import Engine, EncodeOptions, ItemResult
from .scoring import ScoreOptions, ScoreResult

__all__ = ["Engine", "EncodeOptions", "ItemResult", "ScoreOptions", "ScoreResult"]
