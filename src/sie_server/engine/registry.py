"""Model registry: which models exist, loading them once on first use, their schedulers."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from ..config import Settings
from ..errors import ModelNotFound, ModelUnavailable, SIEError
from ..models import FAMILIES, EncoderModel, ModelSpec
from ..runtime.device import Placement
from .catalog import load_catalog, spec_for_source
from .scheduler import Scheduler
from .sources import resolve

log = logging.getLogger(__name__)

RETRY_COOLDOWN_S = 30.0  # a failed load is retried by a request after this long


@dataclass(eq=False)
class ModelHandle:
    spec: ModelSpec
    state: str = "registered"  # registered | loading | ready | failed
    model: EncoderModel | None = None
    scheduler: Scheduler | None = None
    error: SIEError | None = None
    failed_at: float = 0.0
    last_used: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelRegistry:
    def __init__(self, settings: Settings, placement: Placement) -> None:
        self.settings = settings
        self.placement = placement
        specs, defaults = load_catalog(settings.catalog_files)
        for name, source in settings.models.items():
            specs[name] = spec_for_source(name, source, specs.get(name))
        self.defaults = settings.default_models if settings.default_models is not None else defaults
        unknown_family = [s.name for s in specs.values() if s.family not in FAMILIES]
        self._handles = {n: ModelHandle(s) for n, s in specs.items() if n not in unknown_family}
        for name in self.defaults:
            if name not in self._handles:
                raise ValueError(f"default model {name!r} is not in the catalog")

    def handles(self) -> list[ModelHandle]:
        return list(self._handles.values())

    def get(self, name: str) -> ModelHandle:
        """The ready handle for `name`, loading it first if needed (concurrent callers load once)."""
        handle = self._handles.get(name)
        if handle is None:
            raise ModelNotFound(f"model {name!r} is not served here; GET /v1/models lists them")
        handle.last_used = time.monotonic()
        if handle.state == "ready":
            return handle
        with handle.lock:
            if handle.state == "ready":
                return handle
            if handle.state == "failed" and time.monotonic() - handle.failed_at < RETRY_COOLDOWN_S:
                raise handle.error
            self._load(handle)
            return handle

    def _load(self, handle: ModelHandle) -> None:
        spec = handle.spec
        handle.state = "loading"
        started = time.perf_counter()
        try:
            folder = resolve(spec.name, spec.source, spec.family, self.settings.allow_download)
            model = FAMILIES[spec.family](spec, folder, self.placement)
        except Exception as exc:  # noqa: BLE001 - a bad model must never take the server down
            err = exc if isinstance(exc, SIEError) else ModelUnavailable(f"{spec.name}: {exc}")
            handle.state, handle.error, handle.failed_at = "failed", err, time.monotonic()
            log.error("loading %s failed: %s", spec.name, err.message)
            raise err from None
        s = self.settings
        handle.model = model
        handle.scheduler = Scheduler(model, max_batch_tokens=s.max_batch_tokens,
                                     max_batch_items=s.max_batch_items,
                                     max_queued_tokens=s.max_queued_tokens)
        handle.state, handle.error = "ready", None
        log.info("loaded %s (%s) from %s in %.1fs", spec.name, spec.family, folder,
                 time.perf_counter() - started)

    def close(self) -> None:
        for handle in self._handles.values():
            if handle.scheduler is not None:
                handle.scheduler.close(drain=True)
