"""HTTP API: validation, wire format and routes. Never touches tensors."""

from .app import create_app

__all__ = ["create_app"]
