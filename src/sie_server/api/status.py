"""`GET /status`: what the server computes on and what its engine has done, read from the
engine's own counters (the Prometheus registry behind `/metrics`). Totals since start: a reader
that polls gets throughput from the differences (the page at `/` does)."""

from __future__ import annotations

import time
from typing import Any

from .. import __version__
from ..engine import Engine
from . import models as model_info


def build(engine: Engine) -> dict[str, Any]:
    metrics, registry = engine.metrics, engine.registry
    value = metrics.registry.get_sample_value
    requests: dict[str, int] = {}
    for family in metrics.requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                name = sample.labels["model"]
                requests[name] = requests.get(name, 0) + int(sample.value)
    models = {}
    for h in registry.handles():
        label = {"model": h.spec.name}
        models[h.spec.name] = {
            "state": model_info.STATES[h.state],
            "memory_bytes": h.held_bytes,
            "queued_tokens": int(value("sie_queue_tokens", label) or 0),
            "requests": requests.get(h.spec.name, 0),
            "items": int(value("sie_batch_items_sum", label) or 0),
            "tokens": int(value("sie_batch_tokens_sum", label) or 0),
            "batches": int(value("sie_batch_items_count", label) or 0),
        }
    errors = [{"code": code, "count": int(value("sie_errors_total", {"code": code}) or 0),
               "status": e.status, "route": e.route, "model": e.model, "message": e.message,
               "last_at": e.at}
              for code, e in metrics.last_errors.copy().items()]
    placement = engine.placement
    now = time.time()
    return {
        "version": __version__,
        "time": now,
        "uptime_s": now - model_info.STARTED,
        "device": str(placement.device),
        "dtype": placement.dtype_name,
        "dtype_reason": placement.reason,
        "memory_budget_bytes": registry.budget,
        "max_batch_tokens": registry.max_batch_tokens,
        "models": models,
        "errors": sorted(errors, key=lambda e: -e["last_at"]),
    }
