"""Every metric the server defines moves when its event happens (in-process engine + app).

OOM cannot be produced for real on a CPU, so that one fault is injected into the forward."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from prometheus_client import Metric

from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.errors import Overloaded

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def samples(engine: Engine) -> dict[tuple[str, tuple], float]:
    out = {}
    metric: Metric
    for metric in engine.metrics.registry.collect():
        for s in metric.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def moved(before: dict, after: dict, name: str) -> bool:
    keys = {k for k in after if k[0] == name}
    return any(after[k] != before.get(k, 0.0) for k in keys)


@pytest.fixture()
def engine(bge_m3_dir: Path):
    eng = Engine(Settings(models={"BAAI/bge-m3": str(bge_m3_dir)}, default_models=[],
                          device="cpu", dtype="float32", memory_budget_bytes=120_000_000,
                          max_batch_tokens=64))
    yield eng
    eng.close()


def test_engine_metrics_move(engine: Engine) -> None:
    before = samples(engine)
    engine.encode(MINILM, ["hello world", "a second text"] * 8)
    after = samples(engine)
    for name in ("sie_tokenize_seconds_count", "sie_queue_seconds_count",
                 "sie_inference_seconds_count", "sie_batch_items_count", "sie_batch_tokens_sum",
                 "sie_models_loaded", "sie_model_memory_bytes", "sie_model_loads_total"):
        assert moved(before, after, name), name

    before = after
    engine.encode("BAAI/bge-m3", ["evicts the other model"])  # budget fits one of the two
    after = samples(engine)
    assert moved(before, after, "sie_model_evictions_total")


def test_queue_depth_and_rejections_move(engine: Engine) -> None:
    engine.encode(MINILM, ["warm"])
    handle = engine.registry.get(MINILM)
    gate, running = threading.Event(), threading.Event()
    forward = handle.model.forward
    handle.model.forward = lambda batch: (running.set(), gate.wait(30), forward(batch))[2]
    engine.settings.max_queued_tokens = 50
    handle.scheduler.max_queued_tokens = 50
    try:
        first = engine.submit(MINILM, ["blocks the worker"])
        assert running.wait(30)  # the worker holds `first`: what follows stays queued
        queued = [engine.submit(MINILM, ["waits in the queue " * 12]) for _ in range(2)]
        depth = samples(engine)[("sie_queue_tokens", (("model", MINILM),))]
        assert depth >= 2 * 50  # twice the limit: nobody else gets in
        with pytest.raises(Overloaded):
            engine.submit(MINILM, ["too much " * 20])
        counts = samples(engine)
        assert counts[("sie_rejected_total", (("model", MINILM), ("reason", "queue_full")))] == 1
        assert counts[("sie_rejected_total", (("model", MINILM), ("reason", "too_large")))] == 0
    finally:
        gate.set()
    first.result(30), [q.result(30) for q in queued]
    assert samples(engine)[("sie_queue_tokens", (("model", MINILM),))] == 0


def test_oom_splits_the_batch_and_loses_nothing(engine: Engine) -> None:
    texts = [f"text number {i}" for i in range(12)]
    expected = [r.dense for r in engine.encode(MINILM, texts)]
    handle = engine.registry.get(MINILM)
    forward = handle.model.forward

    def fail_big_batches(batch):
        if batch.num_seqs > 3:
            raise torch.OutOfMemoryError("injected")
        return forward(batch)

    handle.model.forward = fail_big_batches
    engine.settings.max_batch_tokens = handle.scheduler.max_batch_tokens = 10_000
    before = samples(engine)
    assert before[("sie_oom_splits_total", (("model", MINILM),))] == 0  # there from the load
    got = engine.encode(MINILM, texts)
    assert moved(before, samples(engine), "sie_oom_splits_total")
    for g, e in zip(got, expected):
        assert float(g.dense @ e) >= 0.99999


def test_adapter_metrics_move(tmp_path: Path, minilm_dir: Path) -> None:
    from lora_adapters import make_adapter

    make_adapter(minilm_dir, tmp_path / "team/a1", r=4, targets=["query", "value"], seed=1)
    eng = Engine(Settings(default_models=[], device="cpu", dtype="float32",
                          adapter_roots=[tmp_path]))
    try:
        before = samples(eng)
        eng.encode(MINILM, ["with an adapter"], options={"lora_id": "team/a1"})
        loaded = samples(eng)
        with pytest.raises(Exception):
            eng.encode(MINILM, ["x"], options={"lora_id": "team/missing"})
        eng.unload_adapter(MINILM, "team/a1")
        after = samples(eng)
    finally:
        eng.close()
    assert after[("sie_adapter_loads_total", (("model", MINILM), ("outcome", "loaded")))] == 1
    assert moved(before, after, "sie_adapter_evictions_total")
    label = (("model", MINILM),)
    assert loaded[("sie_adapters_loaded", label)] == 1
    assert loaded[("sie_adapter_memory_bytes", label)] > 0
    assert after[("sie_adapters_loaded", label)] == 0
    assert after[("sie_adapter_memory_bytes", label)] == 0
