"""SIE on Ray: a Ray Serve application hosting the HTTP app, and a Ray Data embedder.

`serve run sie_server.ray:app models='{"NAME": "PATH"}' num_replicas=2` builds the Serve
application (`serve.app_builder`); `sie_server.ray.data.embed_dataset` encodes a Dataset.
Nothing here imports ray until it is used, so `sie-server serve` never needs it.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "build_app", "SIEDeployment"):
        from . import serve

        return getattr(serve, name)
    raise AttributeError(name)
