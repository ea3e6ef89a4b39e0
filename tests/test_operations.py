"""Serving safely (issue 6): API keys, request ids, OpenAI endpoint, metrics, backpressure,
deadlines, disconnects, eviction, failed loads, fuzzed bodies and SIGTERM. Real server
processes on loopback; loops are bounded in count and time."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import time
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
import reference
from hypothesis import HealthCheck, given, settings, strategies as st
from texts import SHORT_TEXTS

from sie_sdk import SIEClient
from sie_sdk.errors import OverloadedError, UnauthorizedError
from sie_sdk.types import Item

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def minilm_ref(minilm_dir: Path) -> dict[str, np.ndarray]:
    return dict(zip(SHORT_TEXTS, reference.st_encode(minilm_dir, SHORT_TEXTS)))


@pytest.fixture(scope="module")
def keyed_server(start_module_server):
    return start_module_server(["--api-key", "k-one", "--api-key", "k-two"])


# ------------------------------------------------------------------------------ API keys

def test_api_keys_guard_inference_and_admin_routes_not_health(keyed_server) -> None:
    url = keyed_server.url
    body = {"items": [{"text": "x"}]}
    missing = httpx.post(f"{url}/v1/encode/{MINILM}", json=body)
    unknown_model = httpx.post(f"{url}/v1/encode/no/such-model", json=body,
                               headers={"authorization": "Bearer wrong"})
    assert missing.status_code == unknown_model.status_code == 401
    # says nothing about which models exist (the request ids differ)
    assert ({**missing.json()["detail"], "request_id": ""}
            == {**unknown_model.json()["detail"], "request_id": ""})
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(url + path).status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer k-two"}).status_code == 200
    with pytest.raises(UnauthorizedError):
        SIEClient(url, api_key="nope").encode(MINILM, "x")
    assert SIEClient(url, api_key="k-one").encode(MINILM, "x")["dense"].shape == (384,)


def test_sdk_takes_the_api_key_from_the_environment(keyed_server, monkeypatch) -> None:
    monkeypatch.setenv("SIE_API_KEY", "k-two")
    assert SIEClient(keyed_server.url).encode(MINILM, "x")["dense"].shape == (384,)


# --------------------------------------------------------------------- request ids, logs

def test_request_id_is_echoed_or_generated_and_logged(bge_m3_server) -> None:
    r = httpx.post(f"{bge_m3_server.url}/v1/encode/{MINILM}", json={"items": [{"text": "a"}]},
                   headers={"x-request-id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    other = httpx.get(f"{bge_m3_server.url}/healthz")
    assert len(other.headers["x-request-id"]) >= 16
    time.sleep(0.2)
    lines = [json.loads(line) for line in bge_m3_server.output().splitlines()
             if line.startswith("{")]
    assert any(e["request_id"] == "trace-42" and e.get("status") == 200 for e in lines)
    metrics = httpx.get(f"{bge_m3_server.url}/metrics").text
    assert f'sie_requests_total{{model="{MINILM}",route="encode",status="200"}}' in metrics
    assert 'sie_request_seconds_count{route="encode"}' in metrics


# ------------------------------------------------------------------- OpenAI compatibility

def test_openai_client_float_and_base64(bge_m3_server, minilm_ref) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{bge_m3_server.url}/v1", api_key="unused")
    texts = SHORT_TEXTS[:5]
    out = client.embeddings.create(model=MINILM, input=texts)
    vecs = np.array([d.embedding for d in out.data], dtype=np.float32)
    ref = np.stack([minilm_ref[t] for t in texts])
    assert ((vecs * ref).sum(1) >= 0.9999).all()
    counts = SIEClient(bge_m3_server.url).encode(MINILM, [Item(text=t) for t in texts])
    assert out.usage.prompt_tokens == sum(r["token_count"] for r in counts)
    single = client.embeddings.create(model=MINILM, input=texts[0], encoding_format="base64")
    # the client decodes base64 itself when it asked for it
    emb = single.data[0].embedding
    vec = np.frombuffer(__import__("base64").b64decode(emb), "<f4") if isinstance(emb, str) else np.array(emb)
    np.testing.assert_allclose(vec, vecs[0], atol=1e-6)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MINILM, input=texts[0], dimensions=64)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nobody/nothing", input="x")


def test_openai_dimensions_for_matryoshka_models(start_server, tmp_path, minilm_dir) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(f"models:\n  mini-mrl:\n    family: sentence-transformers\n"
                       f"    source: {minilm_dir}\n    matryoshka: true\n")
    server = start_server(["--catalog", str(catalog), "--default-model", "mini-mrl"])
    r = httpx.post(f"{server.url}/v1/embeddings",
                   json={"model": "mini-mrl", "input": ["hello", "world"], "dimensions": 64}).json()
    full = httpx.post(f"{server.url}/v1/embeddings", json={"model": "mini-mrl", "input": ["hello"]}).json()
    short = np.array(r["data"][0]["embedding"])
    assert short.shape == (64,) and abs(np.linalg.norm(short) - 1) < 1e-5
    cut = np.array(full["data"][0]["embedding"][:64])
    np.testing.assert_allclose(short, cut / np.linalg.norm(cut), atol=1e-6)


# ------------------------------------------------------------------ backpressure, overload

def test_overload_answers_own_result_or_queue_full(start_server, minilm_ref) -> None:
    """4x more work than the queue takes: each request gets its own correct vectors or a
    503 QUEUE_FULL with Retry-After (SIE's code; the SDK's retries are off here)."""
    server = start_server(["--max-queued-tokens", "600", "--max-batch-tokens", "256"])
    texts = SHORT_TEXTS[:40]

    def call(i: int):
        chunk = [texts[(i + k) % len(texts)] for k in range(8)]
        try:
            res = SIEClient(server.url, timeout=60, max_retries=0).encode(MINILM, [Item(text=t) for t in chunk])
        except OverloadedError as err:
            assert err.status == 503 and err.code == "QUEUE_FULL"
            assert err.retry_after and err.retry_after >= 1
            return "refused"
        for t, r in zip(chunk, res):
            assert float(r["dense"] @ minilm_ref[t]) >= 0.9999, "a result went to the wrong item"
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        kinds = list(pool.map(call, range(128)))  # each answered within the client's 60 s
    assert kinds.count("ok") > 0 and kinds.count("refused") > 0, kinds
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_deadline_gives_408_and_drops_queued_work(bge_m3_server) -> None:
    """A deadline the client set itself: 408 DEADLINE_EXCEEDED, which no SDK retries (SIE's
    SDK retries a 504 for up to 15 minutes)."""
    many = [{"text": t} for t in SHORT_TEXTS * 4]
    r = httpx.post(f"{bge_m3_server.url}/v1/encode/BAAI/bge-m3",
                   json={"items": many, "params": {"output_types": ["multivector"]}},
                   headers={"x-request-timeout": "0.001"}, timeout=60)
    assert r.status_code == 408 and r.json()["detail"]["code"] == "DEADLINE_EXCEEDED"
    assert r.headers["x-sie-error-code"] == "DEADLINE_EXCEEDED"
    r = httpx.post(f"{bge_m3_server.url}/v1/encode/BAAI/bge-m3",
                   json={"items": many[:2], "params": {"options": {"timeout_s": 30}}})
    assert r.status_code == 200


def test_client_disconnect_drops_queued_work(bge_m3_server) -> None:
    body = json.dumps({"items": [{"text": t} for t in SHORT_TEXTS * 12],
                       "params": {"output_types": ["multivector"]}}).encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", bge_m3_server.port)) as s:
            s.sendall(b"POST /v1/encode/BAAI/bge-m3 HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(0.05)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{bge_m3_server.url}/metrics").text
        if 'sie_requests_total{model="BAAI/bge-m3",route="encode",status="499"}' in metrics:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the server never noticed the disconnect")
    assert SIEClient(bge_m3_server.url).encode("BAAI/bge-m3", "still fine")["dense"].shape == (64,)


# ---------------------------------------------------------------- loading and eviction

def test_eviction_under_traffic_answers_everything(start_server, bge_m3_dir, minilm_ref) -> None:
    """Budget for about one model: alternating traffic evicts the idle one, never a busy one."""
    server = start_server(["--model", f"BAAI/bge-m3={bge_m3_dir}", "--memory-budget-bytes",
                           str(120_000_000), "--default-model", MINILM])
    client = SIEClient(server.url, timeout=120, max_retries=0)

    def call(i: int) -> str:
        model = MINILM if i % 2 else "BAAI/bge-m3"
        t = SHORT_TEXTS[i % 20]
        try:
            r = client.encode(model, Item(text=t))
        except Exception as err:  # noqa: BLE001
            assert getattr(err, "status", None) == 503 and err.retry_after, err
            return "503"
        if model == MINILM:
            assert float(r["dense"] @ minilm_ref[t]) >= 0.9999
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(call, range(24)))
    assert "ok" in outcomes
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "sie_model_evictions_total" in metrics
    models = {m["id"]: m for m in client.models()}
    # one of the two is loaded (BGE-M3's profiles are listed too, as "BAAI/bge-m3:<profile>",
    # with its state: count the two models only)
    assert sum(models[m]["state"] == "loaded" for m in (MINILM, "BAAI/bge-m3")) == 1
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_slow_load_gives_503_retry_after_and_concurrent_first_requests_load_once(
        start_server, bge_m3_dir) -> None:
    server = start_server(["--model", f"BAAI/bge-m3={bge_m3_dir}", "--model-load-timeout", "0.001"])
    url = f"{server.url}/v1/encode/BAAI/bge-m3"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = list(pool.map(lambda _: httpx.post(url, json={"items": [{"text": "x"}]}), range(8)))
    # the load takes ~0.3 s: requests arriving before it ends get 503 + Retry-After, later
    # ones are served; the first cannot win the race
    waited = [r for r in first if r.status_code == 503]
    assert waited and all(r.status_code in (200, 503) for r in first)
    assert all(int(r.headers["retry-after"]) >= 1 for r in waited)
    assert "still loading" in waited[0].json()["detail"]["message"]
    assert all(r.json()["detail"]["code"] == "MODEL_LOADING" for r in waited)
    deadline = time.monotonic() + 60
    while (r := httpx.post(url, json={"items": [{"text": "x"}]})).status_code == 503:
        assert time.monotonic() < deadline, "the load never finished"
        time.sleep(0.2)
    assert r.status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'sie_model_loads_total{model="BAAI/bge-m3",outcome="loaded"} 1.0' in metrics
    entry = next(m for m in httpx.get(f"{server.url}/v1/models").json()["models"]
                 if m["id"] == "BAAI/bge-m3")
    assert entry["state"] == "loaded" and entry["memory_bytes"] > 0 and entry["last_used"]


def test_a_model_that_fails_to_load_does_not_take_the_server_down(start_server, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    (broken / "tokenizer.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"garbage")
    (broken / "modules.json").write_text("[]")
    server = start_server(["--model", f"broken/model={broken}", "--load-retry-cooldown", "1"])
    for _ in range(2):
        r = httpx.post(f"{server.url}/v1/encode/broken/model", json={"items": [{"text": "x"}]})
        # SIE's terminal code: 502 MODEL_LOAD_FAILED, no Retry-After, so no SDK retries it
        assert r.status_code == 502 and "broken/model" in r.json()["detail"]["message"]
        assert r.json()["detail"]["code"] == "MODEL_LOAD_FAILED" and "retry-after" not in r.headers
        time.sleep(1.1)  # after the cool-down the next request retries the load
    assert SIEClient(server.url).encode(MINILM, "fine")["dense"].shape == (384,)
    assert 'sie_model_loads_total{model="broken/model",outcome="failed"} 2.0' in httpx.get(
        f"{server.url}/metrics").text


# -------------------------------------------------------------------------- fuzzed bodies

_json = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
                     | st.floats(allow_nan=False)
                     | st.text(max_size=20),
                     lambda children: st.lists(children, max_size=4)
                     | st.dictionaries(st.sampled_from(["items", "params", "text", "id",
                                                       "output_types", "options", "truncate",
                                                       "lora_id", "x"]), children, max_size=4),
                     max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_json, binary=st.booleans(), raw=st.binary(max_size=64))
def test_fuzzed_bodies_never_give_500(bge_m3_server, body, binary: bool, raw: bytes) -> None:
    url = f"{bge_m3_server.url}/v1/encode/{MINILM}"
    for content, ctype in ((msgpack.packb(body) if binary else json.dumps(body).encode(),
                            "application/msgpack" if binary else "application/json"),
                           (raw, "application/msgpack")):
        r = httpx.post(url, content=content, headers={"content-type": ctype}, timeout=30)
        assert r.status_code < 500, (body, r.text)


def test_server_healthy_after_fuzzing(bge_m3_server) -> None:
    assert httpx.get(f"{bge_m3_server.url}/healthz").status_code == 200
    assert SIEClient(bge_m3_server.url).encode(MINILM, "ok")["dense"].shape == (384,)


# ------------------------------------------------------------------------------ SIGTERM

def test_sigterm_finishes_accepted_requests_and_exits_0(start_server, minilm_ref) -> None:
    server = start_server([])
    texts = SHORT_TEXTS[:16]

    def call(i: int):
        try:
            r = SIEClient(server.url, timeout=60).encode(MINILM, [Item(text=t) for t in texts * 4])
        except Exception as err:  # noqa: BLE001 - refused before being accepted is fine
            return type(err).__name__
        for t, v in zip(texts * 4, r):
            assert float(v["dense"] @ minilm_ref[t]) >= 0.9999
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, i) for i in range(8)]
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        outcomes = [f.result() for f in futures]
    assert server.proc.wait(60) == 0
    assert "ok" in outcomes, outcomes
    assert set(outcomes) <= {"ok", "SIEConnectionError"}, outcomes
