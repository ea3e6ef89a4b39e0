"""Model registry: pinned and busy models are never evicted; LRU picks the idle one."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.errors import ModelUnavailable

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
BUDGET = 120_000_000  # fits all-MiniLM-L6-v2 (~91 MB) or the BGE-M3 test model (~67 MB), not both


def engine(folder: Path, **kw) -> Engine:
    return Engine(Settings(models={"BAAI/bge-m3": str(folder)}, default_models=[], device="cpu",
                           memory_budget_bytes=BUDGET, **kw))


def test_pinned_model_is_never_evicted(bge_m3_dir: Path) -> None:
    eng = engine(bge_m3_dir, pinned_models=[MINILM])
    try:
        eng.encode(MINILM, ["x"])
        with pytest.raises(ModelUnavailable) as err:
            eng.encode("BAAI/bge-m3", ["y"])
        assert err.value.retry_after and "pinned or busy" in err.value.message
        assert eng.registry.get(MINILM).state == "ready"
    finally:
        eng.close()


def test_busy_model_is_not_evicted_and_idle_one_is(bge_m3_dir: Path) -> None:
    eng = engine(bge_m3_dir)
    try:
        eng.encode(MINILM, ["warm"])
        handle = eng.registry.get(MINILM)
        gate = threading.Event()
        forward = handle.model.forward
        handle.model.forward = lambda batch: (gate.wait(30), forward(batch))[1]
        running = eng.submit(MINILM, ["in flight"])
        with pytest.raises(ModelUnavailable):
            eng.encode("BAAI/bge-m3", ["needs the memory"])
        assert handle.state == "ready"
        gate.set()
        assert running.result(30)[0].dense.shape == (384,)  # answered, not lost
        assert eng.encode("BAAI/bge-m3", ["now it fits"])[0].dense.shape == (64,)
        assert handle.state == "evicted"
        assert eng.encode(MINILM, ["loads again"])[0].dense.shape == (384,)
        states = {h.spec.name: h.state for h in eng.registry.handles()}
        assert states["BAAI/bge-m3"] == "evicted"
    finally:
        eng.close()
