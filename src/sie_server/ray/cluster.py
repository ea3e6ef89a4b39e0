"""Starting or joining a Ray cluster, and Serve's HTTP proxy, for SIE's Ray entry points."""

from __future__ import annotations

import os
import sys
from typing import Any

# For a local cluster: keep every Ray process on the loopback address (Ray binds the
# machine's routable one otherwise), and no token auth for a cluster only this machine can
# reach (Ray 2.60 turns it on by default and writes ~/.ray/auth_token). Ray reads the first
# at import, so `connect` sets them before importing ray (and patches an earlier import).
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def connect(address: str | None = None, *, num_cpus: float | None = None,
            num_gpus: float | None = None, **init: Any) -> None:
    """Join the cluster at `address` ("auto", "ray://host:10001", "host:6379"), or start a
    local one on 127.0.0.1 when `address` is None."""
    if address is None:
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
        if "ray" in sys.modules and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
    import ray

    if ray.is_initialized():
        return
    if address is not None:
        ray.init(address=address, **init)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **init)


def start_http(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve's HTTP proxy on host:port (a no-op when Serve already runs on the cluster)."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
