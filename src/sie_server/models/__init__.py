"""Model families: each module here registers one family in `base.FAMILIES`."""

import importlib
import pkgutil

from .base import FAMILIES, EncoderModel, ModelInfo, ModelSpec

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["FAMILIES", "EncoderModel", "ModelInfo", "ModelSpec"]
