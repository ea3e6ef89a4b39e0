"""Prometheus metrics. One `Metrics` per engine, on its own registry (several engines can
live in one process, e.g. in tests or Ray replicas)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_TOKENS = (16, 64, 256, 1024, 4096, 8192, 16384, 32768, 65536)
_ERROR_MESSAGE_CHARS = 300  # of an error's message kept as its code's last


@dataclass(frozen=True)
class LastError:
    """The latest error response with one code."""

    status: int
    route: str
    model: str
    message: str
    at: float  # time.time()


class Metrics:
    """Every metric the server exports; names are the Prometheus names without `sie_`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sie_requests", "HTTP requests by model, route and status",
                                ["model", "route", "status"], registry=r)
        self.request_seconds = Histogram("sie_request_seconds", "HTTP request latency, total",
                                         ["route"], buckets=_LATENCY, registry=r)
        self.queue_seconds = Histogram("sie_queue_seconds", "time items wait in the queue",
                                       ["model"], buckets=_LATENCY, registry=r)
        self.tokenize_seconds = Histogram("sie_tokenize_seconds", "tokenization time per request",
                                          ["model"], buckets=_LATENCY, registry=r)
        self.inference_seconds = Histogram("sie_inference_seconds",
                                           "batch time from launch to results on the host",
                                           ["model"], buckets=_LATENCY, registry=r)
        self.batch_items = Histogram("sie_batch_items", "items per batch", ["model"],
                                     buckets=_SIZES, registry=r)
        self.batch_tokens = Histogram("sie_batch_tokens", "real tokens per batch", ["model"],
                                      buckets=_TOKENS, registry=r)
        self.queue_tokens = Gauge("sie_queue_tokens", "tokens waiting per model", ["model"],
                                  registry=r)
        self.models_loaded = Gauge("sie_models_loaded", "models loaded now", registry=r)
        self.model_memory = Gauge("sie_model_memory_bytes", "memory held by each loaded model",
                                  ["model"], registry=r)
        self.model_loads = Counter("sie_model_loads", "model loads by outcome",
                                   ["model", "outcome"], registry=r)
        self.model_evictions = Counter("sie_model_evictions", "models evicted to free memory",
                                       ["model"], registry=r)
        self.adapter_loads = Counter("sie_adapter_loads", "LoRA adapter loads by outcome",
                                     ["model", "outcome"], registry=r)
        self.adapter_evictions = Counter("sie_adapter_evictions", "LoRA adapters evicted or unloaded",
                                         ["model"], registry=r)
        self.oom_splits = Counter("sie_oom_splits", "batches split after running out of memory",
                                  ["model"], registry=r)
        self.rejected = Counter("sie_rejected", "requests refused at admission: reason "
                                "queue_full (503 QUEUE_FULL) or too_large (413, over the queue "
                                "limit alone)", ["model", "reason"], registry=r)
        self.adapters_loaded = Gauge("sie_adapters_loaded", "LoRA adapters loaded now per model",
                                     ["model"], registry=r)
        self.adapter_memory = Gauge("sie_adapter_memory_bytes",
                                    "memory held by each model's loaded LoRA adapters (also "
                                    "counted in sie_model_memory_bytes)", ["model"], registry=r)
        self.errors = Counter("sie_errors", "error responses by SIE error code", ["code"],
                              registry=r)
        self.last_errors: dict[str, LastError] = {}  # code -> its latest occurrence

    def error(self, code: str, status: int, route: str, model: str, message: str) -> None:
        """Count an error response and keep it as its code's latest."""
        self.errors.labels(code).inc()
        self.last_errors[code] = LastError(status, route, model,
                                           message[:_ERROR_MESSAGE_CHARS], time.time())

    def start_model(self, model: str) -> None:
        """Create a loaded model's counters at zero, so that rates and alerts see the series
        before its first event."""
        self.oom_splits.labels(model)
        self.model_evictions.labels(model)
        self.adapter_evictions.labels(model)
        for reason in ("queue_full", "too_large"):
            self.rejected.labels(model, reason)
        for outcome in ("loaded", "failed"):
            self.adapter_loads.labels(model, outcome)

    def render(self) -> bytes:
        return generate_latest(self.registry)
