"""Issue 11, item 4 through a real server: one request near the admission limit (API key 1)
and a stream of small requests from other clients (API key 2, and key 1 itself) arriving
behind it. Every small request is answered, quickly relative to the large one; the large one
completes; nothing is lost or mixed (each vector equals the same text encoded alone)."""
from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import numpy as np

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
LIMIT = 20_000  # --max-queued-tokens


def encode(client: httpx.Client, key: str, texts: list[str]) -> tuple[int, list, float]:
    started = time.monotonic()
    r = client.post(f"/v1/encode/{MINILM}", json={"items": [{"text": t} for t in texts]},
                    headers={"authorization": f"Bearer {key}"} if key else {}, timeout=600)
    vectors = [np.asarray(i["dense"]["values"], np.float32) for i in r.json()["items"]] \
        if r.status_code == 200 else []
    return r.status_code, vectors, time.monotonic() - started


def test_small_requests_are_served_while_a_giant_one_runs(start_server):
    server = start_server(["--api-key", "key-one", "--api-key", "key-two",
                           "--max-queued-tokens", str(LIMIT), "--max-batch-tokens", "256",
                           "--default-model", MINILM])
    giant_texts = [f"item {i} of the giant request, which holds many words to encode in all"
                   for i in range(1000)]  # ~18 tokens each: ~18k of the 20k limit
    small_texts = [f"small request {i} asks for one vector" for i in range(12)]
    with httpx.Client(base_url=server.url) as c:
        alone = {t: encode(c, "key-two", [t])[1][0] for t in small_texts + giant_texts[:3]}
        assert encode(c, "key-one", ["x " * 30] * (LIMIT // 30 + 50))[0] == 413  # over it

    giant_done = threading.Event()
    small: list[tuple[str, int, list, float]] = []

    def giant():
        with httpx.Client(base_url=server.url) as c:
            try:
                return encode(c, "key-one", giant_texts)
            finally:
                giant_done.set()

    def stream(key: str, offset: int):
        with httpx.Client(base_url=server.url) as c:
            k = offset
            while not giant_done.is_set() and k < offset + 200:
                text = small_texts[k % len(small_texts)]
                small.append((text, *encode(c, key, [text])))
                k += 1

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        big = pool.submit(giant)
        time.sleep(0.5)  # the giant request is queued first
        streams = [pool.submit(stream, key, i) for i, key in
                   enumerate(["key-two", "key-two", "key-one"])]
        status, vectors, giant_s = big.result(600)
        for s in streams:
            s.result(600)

    assert status == 200 and len(vectors) == 1000
    for t, v in zip(giant_texts[:3], vectors[:3]):
        assert float(v @ alone[t]) > 0.9999
    assert len(small) >= 6, len(small)
    assert all(code == 200 for _, code, _, _ in small), [c for _, c, _, _ in small]
    for text, _, (v,), _ in small:
        assert float(v @ alone[text]) > 0.9999, "a small request got another text's vector"
    worst = max(s for *_, s in small)
    print(f"giant request {giant_s:.1f} s; {len(small)} small ones, slowest {worst:.2f} s, "
          f"median {sorted(s for *_, s in small)[len(small) // 2]:.2f} s")
    assert worst < giant_s / 4  # each small one waited a few batches, not for the giant one


def test_a_larger_request_is_admitted_beside_a_stream_of_small_ones(start_server):
    """Without API keys every request is its own client. Twelve clients send requests of 12
    texts (108 tokens) back to back, holding up to ~1,300 of the 2,000 tokens the queue takes,
    while one request of 1,300 tokens is sent through our SDK (it retries 503 QUEUE_FULL): it
    is admitted, since admission reads the queue, not the request's size (the rule before
    needed the queue to fall to 700 tokens, and starved it for the SDK's whole retry window),
    and every request gets its own vectors."""
    from sie_sdk import SIEClient
    from sie_sdk.types import Item

    limit = 2_000
    server = start_server(["--max-queued-tokens", str(limit), "--max-batch-tokens", "256",
                           "--default-model", MINILM])
    large_texts = [f"item {i} of the larger request, in a few words" for i in range(100)]
    small_texts = [f"small request {i} asks for its vector" for i in range(12)]
    with httpx.Client(base_url=server.url) as c:
        alone = {t: encode(c, "", [t])[1][0] for t in small_texts + large_texts[:3]}
        queued = encode(c, "", large_texts)
        assert queued[0] == 200
    stop = threading.Event()
    small: list[tuple[list[str], int, list]] = []

    def stream(k: int) -> None:
        texts = small_texts[k:] + small_texts[:k]
        with httpx.Client(base_url=server.url) as c:
            while not stop.is_set():
                code, vectors, _ = encode(c, "", texts)
                if code != 503:
                    small.append((texts, code, vectors))

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        streams = [pool.submit(stream, i) for i in range(12)]
        time.sleep(2.0)
        with SIEClient(server.url, timeout=120, retry_timeout=60) as client:
            started = time.monotonic()
            out = client.encode(MINILM, [Item(text=t) for t in large_texts])
            large_s = time.monotonic() - started
        stop.set()
        for s in streams:
            s.result(120)
    assert len(out) == 100
    for t, r in zip(large_texts[:3], out[:3]):
        assert float(np.asarray(r["dense"], np.float32) @ alone[t]) > 0.9999
    assert len(small) >= 12 and all(code == 200 for _, code, _ in small)
    for texts, _, vectors in small:
        for text, v in zip(texts, vectors, strict=True):
            assert float(v @ alone[text]) > 0.9999, "a small request got another text's vector"
    print(f"larger request ({len(large_texts)} texts) {large_s:.1f} s beside "
          f"{len(small)} small ones")
