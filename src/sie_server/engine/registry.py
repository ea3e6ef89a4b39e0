"""Model registry: which models exist, loading on first use, and eviction under a memory budget.

Loads run in a background thread; a request waits for its model up to
`Settings.model_load_timeout_s`, then gets 503 with Retry-After while the load goes on.
Concurrent first requests share one load. The memory budget counts every loaded model with
its LoRA adapters. When a model or adapter load would exceed it, the least recently used model
that is neither pinned nor in use is evicted first; a model is in use while any request holds
a lease on it (from lookup until its items are queued) or while its scheduler has work queued
or running.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..config import Settings
from ..errors import (ModelLoadFailed, ModelLoading, ModelNotFound, ResourceExhausted,
                      SIEError)
from ..metrics import Metrics
from ..models import FAMILIES, EncoderModel, ModelInfo, ModelSpec
from ..runtime.device import Placement
from ..runtime.weights import estimate_bytes
from .catalog import load_catalog, spec_for_source
from .scheduler import Scheduler
from .sources import resolve

log = logging.getLogger(__name__)

@dataclass(eq=False)
class ModelHandle:
    spec: ModelSpec
    pinned: bool = False
    state: str = "registered"  # registered | loading | ready | failed | evicted
    model: EncoderModel | None = None
    scheduler: Scheduler | None = None
    error: SIEError | None = None
    failed_at: float = 0.0
    last_used: float = 0.0  # time.time() of the last request
    memory_bytes: int = 0  # the model's weights (its estimate while loading)
    adapter_bytes: int = 0  # its loaded LoRA adapters
    leases: int = 0
    attempts: int = 0  # failed loads in a row
    declared: ModelInfo | None = None  # describe() before the model is loaded
    loaded: threading.Event = field(default_factory=threading.Event)

    @property
    def held_bytes(self) -> int:
        return self.memory_bytes + self.adapter_bytes

    @property
    def in_use(self) -> bool:
        return self.leases > 0 or (self.scheduler is not None and self.scheduler.busy)


class ModelRegistry:
    def __init__(self, settings: Settings, placement: Placement, metrics: Metrics) -> None:
        self.settings = settings
        self.placement = placement
        self.metrics = metrics
        specs, defaults = load_catalog(settings.catalog_files)
        for name, source in settings.models.items():
            specs[name] = spec_for_source(name, source, specs.get(name))
        self.defaults = settings.default_models if settings.default_models is not None else defaults
        for s in specs.values():
            if s.family not in FAMILIES:
                log.warning("catalog model %s has unknown family %r; not served", s.name, s.family)
        self._handles = {n: ModelHandle(s, pinned=s.pinned or n in settings.pinned_models)
                         for n, s in specs.items() if s.family in FAMILIES}
        for name in [*self.defaults, *settings.pinned_models]:
            if name not in self._handles:
                raise ValueError(f"model {name!r} is not in the catalog")
        self.budget = settings.memory_budget_bytes or placement.default_memory_budget()
        self.max_batch_tokens = settings.max_batch_tokens or placement.default_batch_tokens()
        self._lock = threading.Lock()  # guards states, leases and the memory account

    def handles(self) -> list[ModelHandle]:
        return list(self._handles.values())

    def handle(self, name: str) -> ModelHandle | None:
        return self._handles.get(name)

    @contextlib.contextmanager
    def use(self, name: str, timeout: float | None = None) -> Iterator[ModelHandle]:
        """A ready model, held against eviction until the block ends (load it if needed)."""
        handle = self._handles.get(name)
        if handle is None:
            raise ModelNotFound(f"model {name!r} is not served here; GET /v1/models lists them")
        wait = self.settings.model_load_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                handle.last_used = time.time()
                if handle.state == "ready":
                    handle.leases += 1
                    break
                cooldown = self.settings.load_retry_cooldown_s
                if handle.state == "failed" and time.monotonic() - handle.failed_at < cooldown:
                    raise handle.error
                if handle.state != "loading":
                    self._start_load(handle)
                event = handle.loaded
            if not event.wait(max(0.0, deadline - time.monotonic())):
                raise ModelLoading(f"{name} is still loading; retry shortly", retry_after=5)
            if handle.state != "ready":  # this load attempt failed
                raise handle.error
        try:
            yield handle
        finally:
            with self._lock:
                handle.leases -= 1

    def describe(self, handle: ModelHandle) -> ModelInfo | None:
        """What a model offers: the loaded model's info, else what its folder's config says
        (never downloads; None while its files are not on this machine)."""
        model = handle.model
        if model is not None:
            return model.info
        if handle.declared is None:
            spec = handle.spec
            try:
                folder = resolve(spec.name, spec.source, spec.family, allow_download=False)
                handle.declared = FAMILIES[spec.family].describe(spec, folder)
            except Exception:  # noqa: BLE001 - not on disk, or no readable config: unknown
                return None
        return handle.declared

    def is_ready(self, name: str) -> bool:
        handle = self._handles.get(name)
        return handle is not None and handle.state == "ready"

    def get(self, name: str, timeout: float | None = None) -> ModelHandle:
        """Load `name` if needed and return its handle (no lease: for preloading and admin)."""
        with self.use(name, timeout) as handle:
            return handle

    def _start_load(self, handle: ModelHandle) -> None:
        handle.state, handle.loaded = "loading", threading.Event()
        threading.Thread(target=self._load, args=(handle,), name=f"load-{handle.spec.name}",
                         daemon=True).start()

    def _load(self, handle: ModelHandle) -> None:
        spec = handle.spec
        started = time.perf_counter()
        try:
            folder = resolve(spec.name, spec.source, spec.family, self.settings.allow_download)
            self._reserve(handle, estimate_bytes(folder, self.placement.dtype))
            model = FAMILIES[spec.family](spec, folder, self.placement)
        except Exception as exc:  # noqa: BLE001 - a bad model must never take the server down
            with self._lock:
                transient = isinstance(exc, SIEError) and exc.retry_after is not None
                # no room in the budget now is transient (retry_after set): no cool-down
                handle.attempts = 0 if transient else handle.attempts + 1
                err = exc if transient else ModelLoadFailed(
                    exc.message if isinstance(exc, SIEError) else f"{spec.name}: {exc}",
                    detail={"error_class": type(exc).__name__, "attempts": handle.attempts,
                            "permanent": False})
                handle.state = "registered" if transient else "failed"
                handle.error, handle.failed_at = err, time.monotonic()
                handle.memory_bytes = 0
            self.metrics.model_loads.labels(spec.name, "failed").inc()
            log.error("loading %s failed: %s", spec.name, err.message)
            handle.loaded.set()
            return
        s = self.settings
        scheduler = Scheduler(model, max_batch_tokens=self.max_batch_tokens,
                              max_batch_items=s.max_batch_items,
                              max_queued_tokens=s.max_queued_tokens, metrics=self.metrics)
        with self._lock:
            handle.model, handle.scheduler, handle.memory_bytes = model, scheduler, model.memory_bytes
            handle.adapter_bytes = 0
            handle.state, handle.error, handle.attempts = "ready", None, 0
        self.metrics.model_loads.labels(spec.name, "loaded").inc()
        self.metrics.start_model(spec.name)
        self._memory_changed(handle)
        self.metrics.models_loaded.set(sum(h.state == "ready" for h in self._handles.values()))
        log.info("loaded %s (%s) from %s in %.1fs, %.0f MB", spec.name, spec.family, folder,
                 time.perf_counter() - started, handle.memory_bytes / 1e6)
        handle.loaded.set()

    def _reserve(self, handle: ModelHandle, needed: int) -> None:
        """Reserve `needed` bytes for a loading model (its estimate until it has loaded)."""
        def commit() -> None:
            handle.memory_bytes = needed

        self._make_room(handle, needed, handle.spec.name, commit)

    def reserve_adapter(self, handle: ModelHandle, model: EncoderModel, nbytes: int,
                        what: str) -> None:
        """Count a LoRA adapter of `model` against the budget, evicting idle models to make
        room; ResourceExhausted (with Retry-After) when it does not fit."""
        def commit() -> None:
            if handle.model is not model:
                raise ModelLoading(f"{handle.spec.name} was unloaded while {what} loaded; "
                                   "retry", retry_after=1)
            handle.adapter_bytes += nbytes

        self._make_room(handle, nbytes, what, commit)
        self._memory_changed(handle)

    def release_adapter(self, handle: ModelHandle, model: EncoderModel, nbytes: int) -> None:
        """Return an unloaded adapter's bytes (nothing if its model is gone already)."""
        with self._lock:
            if handle.model is not model:
                return
            handle.adapter_bytes = max(0, handle.adapter_bytes - nbytes)
        self._memory_changed(handle)

    def _make_room(self, handle: ModelHandle, needed: int, what: str,
                   commit: Callable[[], None]) -> None:
        """Evict least recently used idle, unpinned models other than `handle` until `needed`
        more bytes fit the budget, then run `commit` under the lock (loads in progress count
        with their estimate)."""
        while True:
            with self._lock:
                used = sum(h.held_bytes for h in self._handles.values()
                           if h.state in ("ready", "loading"))
                if used + needed <= self.budget:
                    commit()
                    return
                idle = [h for h in self._handles.values() if h is not handle
                        and h.state == "ready" and not h.pinned and not h.in_use]
                if not idle:
                    raise ResourceExhausted(
                        f"{what} needs ~{needed / 1e6:.0f} MB but {used / 1e6:.0f} of the "
                        f"{self.budget / 1e6:.0f} MB budget is held by pinned or busy models; "
                        "retry later or raise --memory-budget-bytes", retry_after=10)
                victim = min(idle, key=lambda h: h.last_used)
                victim.state, victim.loaded = "evicted", threading.Event()
            self._unload(victim)
            self.metrics.model_evictions.labels(victim.spec.name).inc()
            log.info("evicted %s to make room for %s", victim.spec.name, what)

    def _memory_changed(self, handle: ModelHandle) -> None:
        self.metrics.model_memory.labels(handle.spec.name).set(handle.held_bytes)
        self.metrics.adapter_memory.labels(handle.spec.name).set(handle.adapter_bytes)

    def _unload(self, handle: ModelHandle) -> None:
        if handle.scheduler is not None:
            handle.scheduler.close(drain=True)
        with self._lock:
            handle.model = handle.scheduler = None
            handle.memory_bytes = handle.adapter_bytes = 0
        self._memory_changed(handle)
        self.metrics.adapters_loaded.labels(handle.spec.name).set(0)  # they went with the model
        self.metrics.models_loaded.set(sum(h.state == "ready" for h in self._handles.values()))
        self.placement.release_memory()

    def close(self) -> None:
        for handle in self._handles.values():
            if handle.scheduler is not None:
                handle.scheduler.close(drain=True)
