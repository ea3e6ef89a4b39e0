"""Issue 11, item 4: fair scheduling and one admission rule (real engine, real MiniLM weights;
the worker is held with a gate around the real forward so that what follows stays queued)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import held_worker
from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.errors import BodyTooLarge, Overloaded

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def engine():
    eng = Engine(Settings(dtype="float32", default_models=[], device="cpu", max_batch_tokens=64,
                          max_queued_tokens=4000))
    eng.encode(MINILM, ["warm"])
    yield eng
    eng.close()


@pytest.fixture()
def held(engine):
    """(scheduler, release, batches): see conftest.held_worker."""
    with held_worker(engine, MINILM) as (sched, release, batches):
        yield sched, release, batches
    sched.max_queued_tokens = engine.settings.max_queued_tokens


def position(batches, future_request) -> int:
    """Index of the first batch holding an item of the request."""
    return next(k for k, b in enumerate(batches) if any(r is future_request for r, _ in b))


def requests_of(batches) -> list:
    return [r for b in batches for r, _ in b]


def test_small_request_behind_a_giant_one_runs_in_the_next_batches(engine, held):
    sched, release, batches = held
    giant_texts = [f"giant item number {i} with a few words" for i in range(200)]
    giant = engine.submit(MINILM, giant_texts)
    small = engine.submit(MINILM, ["a small one", "and its second item"])
    release()
    giant_out, small_out = giant.result(60), small.result(60)
    # batch 0 is the blocker; the small request's items are in batch 1 (at worst 2)
    reqs = [{id(r) for r, _ in b} for b in batches]
    giant_id = next(id(r) for r, _ in batches[1] if len(r.tokens) == 200)
    small_batches = [k for k, ids in enumerate(reqs) if ids - {giant_id} and k > 0]
    assert small_batches and max(small_batches) <= 2, small_batches
    assert len(batches) > 10  # the giant one really spans many batches
    # nothing lost or mixed: every item equals its own single encode
    for text, r in zip(giant_texts[:5] + ["a small one"], giant_out[:5] + small_out[:1]):
        np.testing.assert_allclose(r.dense, engine.encode(MINILM, [text])[0].dense, atol=1e-5)
    assert len(giant_out) == 200 and len(small_out) == 2


def test_tenants_share_batches_round_robin(engine, held):
    """Tenant a sends three requests, tenant b one: b is served in the first batch after the
    blocker even though a queued more and first; a's requests take turns among themselves."""
    sched, release, batches = held
    a = [engine.submit(MINILM, [f"tenant a request {k} item {i}" for i in range(40)],
                       tenant="a") for k in range(3)]
    b = engine.submit(MINILM, ["tenant b asks once"], tenant="b")
    release()
    for f in a + [b]:
        f.result(60)
    first = {r.tenant for r, _ in batches[1]}
    assert first == {"a", "b"}, first
    a_requests = {id(r) for r, _ in batches[1] + batches[2] if r.tenant == "a"}
    assert len(a_requests) >= 2  # not one of a's requests after the other


def test_request_over_the_queue_limit_is_refused_at_once_even_when_idle(engine):
    sched = engine.registry.get(MINILM).scheduler
    sched.max_queued_tokens = 100
    try:
        assert not sched.busy
        with pytest.raises(BodyTooLarge) as err:
            engine.submit(MINILM, ["twelve tokens of text in this item, more or less"] * 20)
        assert "queues at most 100" in err.value.message and "smaller" in err.value.message
        assert engine.encode(MINILM, ["fits"])[0].token_count > 0  # the model still serves
    finally:
        sched.max_queued_tokens = engine.settings.max_queued_tokens


def test_full_queue_still_admits_other_clients_within_their_share(engine, held):
    sched, release, _ = held
    sched.max_queued_tokens = 400
    giant = engine.submit(MINILM, ["nine tokens of text in each item"] * 35, tenant="a")
    more_a = engine.submit(MINILM, ["nine tokens of text in each item"] * 10, tenant="a")
    assert sched._queue.tokens >= 400  # the queue is full, all of it tenant a's
    other = engine.submit(MINILM, ["another client"] * 3, tenant="b")  # b holds nothing
    big_b = engine.submit(MINILM, ["nine tokens of text in each item"] * 30, tenant="b")
    with pytest.raises(Overloaded):  # a already holds more than its share
        engine.submit(MINILM, ["more from a"], tenant="a")
    with pytest.raises(Overloaded):  # b now holds more than its share too
        engine.submit(MINILM, ["more from b"], tenant="b")
    release()
    assert [len(f.result(60)) for f in (giant, more_a, other, big_b)] == [35, 10, 3, 30]


def test_many_small_requests_do_not_starve_a_larger_one(engine, held):
    """Small requests from many clients keep the queue below the limit but too full for a
    request of 3/4 of it to fit beside them: it is queued all the same (admission reads what
    is queued, not the size of what asks). Past the limit, small and large requests get the
    same answer: both queued from a client holding nothing, both refused once the queue holds
    twice the limit."""
    sched, release, _ = held
    sched.max_queued_tokens = 400
    large_texts = ["nine tokens of text in each item"] * 30  # 300 tokens
    small = [engine.submit(MINILM, [f"small client {i} asks"]) for i in range(40)]
    assert 400 - 300 < sched._queue.tokens < 400
    large = [engine.submit(MINILM, large_texts)]
    assert sched._queue.tokens > 400
    small.append(engine.submit(MINILM, ["one more small one"]))  # past the limit, below 2x
    large.append(engine.submit(MINILM, large_texts))
    assert sched._queue.tokens >= 800
    for texts in (["one more small one"], large_texts):
        with pytest.raises(Overloaded):
            engine.submit(MINILM, texts)
    release()
    assert all(len(f.result(60)) == 30 for f in large) and all(len(f.result(60)) == 1 for f in small)


def test_admission_reads_the_queue_not_the_request_size(engine, held):
    """For many queue states (tenants holding random amounts, the queue below, at, past and
    far past the limit), a client's request of 1 token and one of the whole limit are either
    both queued or both refused."""
    sched, release, _ = held
    sched.max_queued_tokens = limit = 300
    rng = np.random.default_rng(7)
    item = "a few tokens of text"
    per_item = len(sched.model.prepare([item], False, None).ids[0])
    for _ in range(12):
        for _ in range(int(rng.integers(1, 8))):
            n = int(rng.integers(1, limit // per_item // 2))
            try:
                engine.submit(MINILM, [item] * n, tenant=f"t{int(rng.integers(0, 5))}")
            except Overloaded:
                pass
        for tenant in ("t0", "t3", "new"):
            outcomes = []
            for size in (1, limit // per_item):  # one item; the whole limit
                before = sched._queue.tokens
                try:
                    f = engine.submit(MINILM, [item] * size, tenant=tenant)
                except Overloaded:
                    outcomes.append(False)
                    continue
                outcomes.append(True)
                f.cancel()  # undo it for the next size: forget its queued tokens
                with sched._cond:
                    queue = sched._queue
                    client = queue._ring[("tenant", tenant)]
                    undone = client.requests.pop()
                    client.tokens -= undone.tokens
                    queue.tokens -= undone.tokens
                    if not client.requests:
                        del queue._ring[("tenant", tenant)]
                assert sched._queue.tokens == before
            assert outcomes[0] == outcomes[1], (tenant, sched._queue.tokens, outcomes)
    assert sched._queue.tokens <= 3 * limit
    release()


def test_cancelled_work_is_dropped_and_adapter_order_kept(engine, held):
    sched, release, batches = held
    doomed = engine.submit(MINILM, [f"cancelled item {i}" for i in range(30)])
    kept = engine.submit(MINILM, [f"kept item {i}" for i in range(30)])
    assert doomed.cancel()
    release()
    assert len(kept.result(60)) == 30
    assert all(not r.future.cancelled() for r in requests_of(batches[1:]))
    for b in batches:
        slots = [r.adapter_slot for r, _ in b]
        assert slots == sorted(slots)
