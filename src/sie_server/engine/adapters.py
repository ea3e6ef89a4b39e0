"""Per-model LoRA adapter manager: resolve, load once, LRU, reference counts, per-batch views.

- `lora_id` is a folder under one of the configured adapter roots (relative, or absolute but
  inside a root; `..` and paths escaping a root are refused), else a Hugging Face hub id
  resolved through the local cache; the network is used only with `allow_download` or for
  ids matching `adapter_download_allow`.
- A load runs on its own thread; concurrent first requests wait on the same load, each for at
  most `adapter_load_timeout_s` (then 503 `adapter_loading`, the load carries on). A failed
  load leaves nothing behind and its error goes to every waiter.
- Every loaded adapter gets a fresh slot number (never reused). Requests hold a reference on
  their slot from queueing until they resolve; unloading or evicting an adapter removes it
  from the name table at once, but its slot (and tensors) live on until the last request
  holding it has finished, so batches in flight never see a slot change meaning.
- The LRU is bounded by `max_adapters` and `max_adapter_bytes`; idle adapters are evicted
  first, then in-use ones (retired: freed when their requests finish). Loaded adapters also
  count against the server's memory budget through `reserve` / `release` (the registry's);
  a load that does not fit there fails with a 503 and Retry-After.
- The model's `adapter_hook` / `adapter_heads` are this manager's: one `BatchLora` per batch,
  built in the model's compute thread and kept there (thread-local) for the heads.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import Settings
from ..errors import AdapterLoading, AdapterNotFound, InvalidAdapter, InvalidRequest, SIEError
from ..metrics import Metrics
from ..models.base import EncoderModel
from ..runtime.batch import PackedBatch
from ..runtime.lora import (CONFIG_FILE, WEIGHT_FILES, BaseModelId, BatchLora, LoraAdapter,
                            StackCache, batch_lora, load_adapter)

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = [CONFIG_FILE, *WEIGHT_FILES, "colbert_linear.pt", "sparse_linear.pt"]


@dataclass(eq=False)
class _Entry:
    lora_id: str
    future: Future = field(default_factory=Future)  # resolves to the LoraAdapter
    adapter: LoraAdapter | None = None
    loaded_at: float = 0.0


def resolve_adapter(lora_id: str, roots: list[Path], may_download: bool) -> Path:
    """The adapter folder for `lora_id`; InvalidRequest for ids that try to leave the roots,
    AdapterNotFound when neither a root nor the hub cache has it."""
    field_ = "lora_id"
    if not lora_id or "\x00" in lora_id or "\\" in lora_id:
        raise InvalidRequest(f"{field_}: {lora_id!r} is not a valid adapter id")
    path = Path(lora_id)
    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    if path.is_absolute() or lora_id.startswith("~"):
        real = path.expanduser().resolve()
        if any(real.is_relative_to(r) for r in resolved_roots) and real.is_dir():
            return real
        raise InvalidRequest(f"{field_}: {lora_id!r} is an absolute path outside the adapter "
                             "roots; name adapters relative to an --adapter-root")
    if ".." in path.parts:
        raise InvalidRequest(f"{field_}: {lora_id!r} must not contain '..'")
    for root in resolved_roots:
        candidate = (root / path).resolve()
        if not candidate.is_relative_to(root):  # a symlink pointing out of the root
            raise InvalidRequest(f"{field_}: {lora_id!r} leads outside the adapter root {root}")
        if candidate.is_dir():
            return candidate
    where = ", ".join(str(r) for r in resolved_roots) or "none configured"
    if not _HUB_ID.match(lora_id):
        raise AdapterNotFound(f"adapter {lora_id!r} is not a folder under the adapter roots "
                              f"({where})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    try:
        return Path(snapshot_download(lora_id, allow_patterns=_HUB_PATTERNS,
                                      local_files_only=HF_HUB_OFFLINE or not may_download))
    except Exception as exc:  # noqa: BLE001 - hub errors are many; the answer is the same
        why = ("downloading it is not allowed (the operator allows downloads with "
               "--allow-download, or for chosen ids with --adapter-download-allow PATTERN)"
               if not may_download else f"the download failed: {type(exc).__name__}: {exc}")
        raise AdapterNotFound(f"adapter {lora_id!r} is not under the adapter roots ({where}) "
                              f"nor in the Hugging Face cache, and {why}") from None


class AdapterManager:
    """The adapters of one model; thread-safe."""

    def __init__(self, model: EncoderModel, settings: Settings, metrics: Metrics,
                 reserve: Callable[[int, str], None] = lambda nbytes, what: None,
                 release: Callable[[int], None] = lambda nbytes: None) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self._reserve, self._release = reserve, release
        spec = model.spec
        cfg_file = model.folder / "config.json"
        model_type = json.loads(cfg_file.read_text()).get("model_type") if cfg_file.is_file() else None
        self.base = BaseModelId(names=(spec.name, spec.source), folder=model.folder,
                                cfg=model.lora_config, model_type=model_type)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # by lora_id, LRU order
        self._by_slot: dict[int, LoraAdapter] = {}  # loaded and retired, by slot
        self._refs: dict[int, int] = {}
        self._retired: set[int] = set()
        self._next_slot = 0
        self._stacks = StackCache()
        self._local = threading.local()
        model.adapter_hook = self.batch_hook
        model.adapter_heads = self.batch_heads

    # ------------------------------------------------------------------ loading and leases

    def ensure_loaded(self, lora_id: str, timeout: float | None = None) -> LoraAdapter:
        """The loaded adapter, loading it (once, whoever asks) if needed; waits up to timeout."""
        with self._lock:
            entry = self._entries.get(lora_id)
            if entry is None:
                entry = self._entries[lora_id] = _Entry(lora_id)
                threading.Thread(target=self._load, args=(entry,), daemon=True,
                                 name=f"adapter-load-{lora_id}").start()
            else:
                self._entries.move_to_end(lora_id)
        limit = self.settings.adapter_load_timeout_s if timeout is None else timeout
        try:
            return entry.future.result(timeout=max(limit, 0.0))
        except FutureTimeout:
            raise AdapterLoading(f"adapter {lora_id!r} for {self.model.spec.name} is still "
                                 f"loading after {limit:.0f}s; retry shortly",
                                 retry_after=2.0) from None

    def acquire(self, lora_id: str, timeout: float | None = None) -> int:
        """A slot for a request to use, holding a reference until `release(slot)`."""
        deadline = time.monotonic() + (self.settings.adapter_load_timeout_s
                                       if timeout is None else timeout)
        for _ in range(5):
            adapter = self.ensure_loaded(lora_id, deadline - time.monotonic())
            with self._lock:
                entry = self._entries.get(lora_id)
                if entry is not None and entry.adapter is adapter:
                    self._refs[adapter.uid] = self._refs.get(adapter.uid, 0) + 1
                    return adapter.uid
            # unloaded or evicted between its load and now: load it again
        raise AdapterLoading(f"adapter {lora_id!r} was evicted again right after each load: "
                             f"more adapters are in use than --max-adapters "
                             f"({self.settings.max_adapters}) / --max-adapter-bytes allow; retry",
                             retry_after=2.0)

    def adapter(self, slot: int) -> LoraAdapter:
        """The adapter of a slot a request holds (see `acquire`)."""
        with self._lock:
            return self._by_slot[slot]

    def release(self, slot: int) -> None:
        with self._lock:
            n = self._refs.get(slot, 0) - 1
            if n > 0:
                self._refs[slot] = n
                return
            self._refs.pop(slot, None)
            if slot in self._retired:
                self._drop(slot)

    def unload(self, lora_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        """Remove an adapter from service (after its load, if one is running). Requests that
        hold it finish with it; None when it is not loaded."""
        with self._lock:
            entry = self._entries.get(lora_id)
        if entry is None:
            return None
        try:
            entry.future.result(timeout=timeout if timeout is not None
                                else self.settings.adapter_load_timeout_s)
        except FutureTimeout:
            raise AdapterLoading(f"adapter {lora_id!r} is still loading; unload it once it "
                                 "has loaded", retry_after=2.0) from None
        except SIEError:
            return None  # its load failed: nothing is loaded
        with self._lock:
            if self._entries.get(lora_id) is not entry:
                return None
            in_use = self._retire(entry)
        log.info("unloaded adapter %s of %s (%d requests still using it)", lora_id,
                 self.model.spec.name, in_use)
        return {"id": lora_id, "in_use": in_use}

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            entries = list(self._entries.values())
            refs = dict(self._refs)
        out = []
        for e in entries:
            if e.adapter is None:
                out.append({"id": e.lora_id, "state": "loading"})
            else:
                out.append({"id": e.lora_id, "state": "ready", **e.adapter.info(),
                            "in_use": refs.get(e.adapter.uid, 0)})
        return out

    @property
    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._by_slot.values())

    def _load(self, entry: _Entry) -> None:
        started = time.perf_counter()
        try:
            adapter = self._read(entry.lora_id)
            self._reserve(adapter.nbytes, f"adapter {entry.lora_id!r} of {self.model.spec.name}")
        except Exception as exc:  # noqa: BLE001 - a bad adapter never takes anything down
            err = exc if isinstance(exc, SIEError) else InvalidAdapter(
                f"adapter {entry.lora_id!r}: {type(exc).__name__}: {exc}")
            log.warning("loading adapter %s for %s failed: %s", entry.lora_id,
                        self.model.spec.name, err.message)
            self.metrics.adapter_loads.labels(self.model.spec.name, "failed").inc()
            with self._lock:
                if self._entries.get(entry.lora_id) is entry:
                    del self._entries[entry.lora_id]
            entry.future.set_exception(err)
            return
        with self._lock:
            adapter.uid = self._next_slot
            self._next_slot += 1
            self._by_slot[adapter.uid] = adapter
            entry.adapter, entry.loaded_at = adapter, time.monotonic()
            self._evict(keep=entry)
            self._count()
        self.metrics.adapter_loads.labels(self.model.spec.name, "loaded").inc()
        log.info("loaded adapter %s for %s (slot %d, rank %d, %d bytes) in %.2fs",
                 entry.lora_id, self.model.spec.name, adapter.uid, adapter.rank, adapter.nbytes,
                 time.perf_counter() - started)
        entry.future.set_result(adapter)

    def _read(self, lora_id: str) -> LoraAdapter:
        s = self.settings
        folder = resolve_adapter(lora_id, s.adapter_roots, s.may_download_adapter(lora_id))
        p = self.model.placement
        adapter = load_adapter(lora_id, folder, self.base, p.device, p.dtype)
        try:
            adapter.heads.update(self.model.load_adapter_heads(folder))
        except Exception as exc:  # noqa: BLE001 - pickle / shape errors
            raise InvalidAdapter(f"adapter {lora_id!r}: its head files do not fit "
                                 f"{self.model.spec.name}: {exc}") from None
        if adapter.nbytes > s.max_adapter_bytes:
            raise InvalidAdapter(f"adapter {lora_id!r} takes {adapter.nbytes} bytes; the adapter "
                                 f"memory limit is {s.max_adapter_bytes} (--max-adapter-bytes)")
        return adapter

    # ------------------------------------------------------------------ under self._lock

    def _evict(self, keep: _Entry) -> None:
        """Retire least recently used adapters until count and bytes fit; idle ones first."""
        s = self.settings

        def over() -> bool:
            ready = [e for e in self._entries.values() if e.adapter is not None]
            return (len(ready) > s.max_adapters or
                    sum(e.adapter.nbytes for e in ready) > s.max_adapter_bytes)

        for idle_only in (True, False):
            for e in list(self._entries.values()):
                if not over():
                    return
                if e is keep or e.adapter is None:
                    continue
                if idle_only and self._refs.get(e.adapter.uid, 0):
                    continue
                log.info("evicting adapter %s of %s (LRU)", e.lora_id, self.model.spec.name)
                self._retire(e)

    def _retire(self, entry: _Entry) -> int:
        """Remove an adapter from service (evicted or unloaded); under self._lock."""
        del self._entries[entry.lora_id]
        self.metrics.adapter_evictions.labels(self.model.spec.name).inc()
        slot = entry.adapter.uid
        in_use = self._refs.get(slot, 0)
        if in_use:
            self._retired.add(slot)
        else:
            self._drop(slot)
        self._count()
        return in_use

    def _count(self) -> None:
        """The loaded-adapters gauge: adapters in service (retired ones still finishing count
        only in the memory gauge, which the registry keeps)."""
        self.metrics.adapters_loaded.labels(self.model.spec.name).set(
            sum(e.adapter is not None for e in self._entries.values()))

    def _drop(self, slot: int) -> None:
        self._retired.discard(slot)
        adapter = self._by_slot.pop(slot, None)
        self._stacks.forget(slot)
        if adapter is not None:
            self._release(adapter.nbytes)

    # ------------------------------------------------------------------ per batch

    def batch_hook(self, batch: PackedBatch) -> BatchLora | None:
        """The model's adapter_hook: resolves the batch's slots once (compute thread)."""
        with self._lock:
            by_slot = dict(self._by_slot)
        view = batch_lora(batch, by_slot, self.model.placement.device, self._stacks)
        self._local.view = (batch, view)
        return view

    def batch_heads(self, batch: PackedBatch, head: str):
        """The model's adapter_heads: (token rows, weights) per adapter replacing `head`."""
        cached = getattr(self._local, "view", None)
        # the encoder's hook may have been built on the batch with bucketed tokens (CPU):
        # its rows are the batch's, plus padding rows no adapter touches
        if cached is not None and (cached[0] is batch or cached[0].bucketed_from is batch):
            view = cached[1]
        else:
            with self._lock:
                by_slot = dict(self._by_slot)
            view = batch_lora(batch, by_slot, self.model.placement.device, self._stacks)
        return [] if view is None else view.head_overrides(head)
