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
    kw.setdefault("memory_budget_bytes", BUDGET)
    return Engine(Settings(models={"BAAI/bge-m3": str(folder)}, default_models=[], device="cpu",
                           dtype="float32", **kw))


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


@pytest.fixture(scope="module")
def minilm_adapter(tmp_path_factory, minilm_dir: Path) -> dict:
    """A rank-64 adapter of all-MiniLM-L6-v2 on every linear (~10 MB in fp32) and its size."""
    from lora_adapters import make_adapter

    root = tmp_path_factory.mktemp("budget-adapters")
    make_adapter(minilm_dir, root / "big", r=64, seed=5,
                        targets=["query", "key", "value", "dense"])
    eng = Engine(Settings(default_models=[], device="cpu", dtype="float32", adapter_roots=[root]))
    try:
        eng.encode(MINILM, ["x"], options={"lora_id": "big"})
        nbytes = eng.adapters(MINILM)[0]["bytes"]
        minilm_bytes = eng.registry.get(MINILM).memory_bytes
    finally:
        eng.close()
    return {"root": root, "bytes": nbytes, "minilm": minilm_bytes}


def test_adapters_count_against_the_memory_budget(bge_m3_dir: Path, minilm_adapter) -> None:
    """Both models fit the budget without the adapter, not with it: loading the adapter evicts
    the idle model; with that model pinned, the adapter is refused (503) and nothing stays."""
    probe = engine(bge_m3_dir, memory_budget_bytes=10**12)
    try:
        bge_bytes = probe.registry.get("BAAI/bge-m3").memory_bytes
    finally:
        probe.close()
    budget = minilm_adapter["minilm"] + bge_bytes + minilm_adapter["bytes"] - 1
    root, lora = minilm_adapter["root"], {"lora_id": "big"}

    eng = engine(bge_m3_dir, memory_budget_bytes=budget, adapter_roots=[root])
    try:
        eng.encode(MINILM, ["first"])
        eng.encode("BAAI/bge-m3", ["second"])  # both fit
        bge = eng.registry.get("BAAI/bge-m3")
        eng.encode(MINILM, ["with the adapter"], options=lora)
        minilm = eng.registry.get(MINILM)
        assert bge.state == "evicted"
        assert minilm.adapter_bytes == minilm_adapter["bytes"]
        assert minilm.held_bytes == minilm.memory_bytes + minilm_adapter["bytes"] <= budget
        # unloading gives the bytes back, and the other model fits again
        eng.unload_adapter(MINILM, "big")
        assert minilm.adapter_bytes == 0
        assert eng.encode("BAAI/bge-m3", ["fits again"])[0].dense.shape == (64,)
    finally:
        eng.close()

    eng = engine(bge_m3_dir, memory_budget_bytes=budget, adapter_roots=[root],
                 pinned_models=["BAAI/bge-m3"])
    try:
        eng.encode("BAAI/bge-m3", ["pinned"])
        base = eng.encode(MINILM, ["base"])[0].dense
        with pytest.raises(ModelUnavailable) as err:
            eng.encode(MINILM, ["base"], options=lora)
        assert err.value.retry_after and "adapter 'big'" in err.value.message
        assert eng.adapters(MINILM) == []  # nothing half loaded
        assert eng.registry.get(MINILM).adapter_bytes == 0
        again = eng.encode(MINILM, ["base"])[0].dense  # the model carries on
        assert float(again @ base) > 0.99999
    finally:
        eng.close()
