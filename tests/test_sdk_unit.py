"""Unit tests of the SDK (sie_sdk): wire format, error mapping, request splitting.

The HTTP server is simulated with httpx.MockTransport; end-to-end tests live elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest

from sie_sdk import (
    GatewayTimeoutError,
    InternalServerError,
    InvalidRequestError,
    Item,
    ModelNotFoundError,
    ModelUnavailableError,
    OverloadedError,
    PayloadTooLargeError,
    SIEAsyncClient,
    SIEClient,
    SIEConnectionError,
    SIEError,
    SIEServerError,
    UnauthorizedError,
    error_from_response,
)
from sie_sdk import wire

DIM = 8


def vec(text: str) -> np.ndarray:
    """Deterministic fake embedding of a text."""
    return np.random.default_rng(abs(hash(text)) % 2**32).standard_normal(DIM).astype(np.float32)


def server_item(item: dict[str, Any], output_types: list[str]) -> dict[str, Any]:
    """Encode one item the way the server does (docs/API.md): raw little-endian bytes."""
    text = item["text"]
    out: dict[str, Any] = {"id": item.get("id"), "token_count": len(text.split()), "truncated": False}
    if "dense" in output_types:
        out["dense"] = {"dims": DIM, "data": vec(text).astype("<f4").tobytes()}
    if "sparse" in output_types:
        out["sparse"] = {
            "indices": np.array([3, 70000, 5], dtype="<i4").tobytes(),
            "values": np.array([0.5, 0.25, 0.125], dtype="<f4").tobytes(),
        }
    if "multivector" in output_types:
        mv = np.stack([vec(text + str(i)) for i in range(3)])
        out["multivector"] = {"shape": [3, DIM], "data": mv.astype("<f4").tobytes()}
    return out


class FakeServer:
    """Records requests and answers /v1/encode like the real server, in msgpack."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
        if request.url.path == "/healthz":
            return httpx.Response(200, text="ok")
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"models": [{"id": "BAAI/bge-m3", "state": "loaded"}]})
        assert request.headers["content-type"] == "application/msgpack"
        body = msgpack.unpackb(request.content, raw=False)
        with self.lock:
            self.bodies.append(body)
        model = request.url.path.removeprefix("/v1/encode/")
        types = body["params"].get("output_types", ["dense"])
        payload = {"model": model, "items": [server_item(i, types) for i in body["items"]]}
        return httpx.Response(
            200, content=msgpack.packb(payload, use_bin_type=True), headers={"Content-Type": "application/msgpack"}
        )


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


def test_import_does_not_import_torch() -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    code = "import sys, sie_sdk, sie_sdk.client, sie_sdk.wire; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONPATH": str(src)}
    )
    assert out.stdout.strip() == "False"


def test_wire_round_trip_msgpack() -> None:
    raw = msgpack.packb(
        {"model": "m", "items": [server_item({"id": "a", "text": "hello world"}, ["dense", "sparse", "multivector"])]},
        use_bin_type=True,
    )
    (r,) = wire.decode_encode_response(wire.unpack(raw, "application/msgpack"))
    assert r["id"] == "a" and r["token_count"] == 2 and r["truncated"] is False
    assert r["dense"].dtype == np.float32 and r["dense"].shape == (DIM,)
    np.testing.assert_array_equal(r["dense"], vec("hello world"))
    assert r["sparse"]["indices"].dtype == np.int32 and r["sparse"]["values"].dtype == np.float32
    assert r["sparse"]["indices"].tolist() == [3, 70000, 5]
    assert r["sparse"]["values"].tolist() == [0.5, 0.25, 0.125]
    assert r["multivector"].dtype == np.float32 and r["multivector"].shape == (3, DIM)
    np.testing.assert_array_equal(r["multivector"][1], vec("hello world1"))
    for arr in (r["dense"], r["sparse"]["indices"], r["sparse"]["values"], r["multivector"]):
        assert arr.flags.writeable and arr.base is None  # owns its memory, not a view of the body
        assert arr.dtype.isnative


def test_wire_round_trip_json() -> None:
    item = {
        "id": None,
        "token_count": 1,
        "truncated": True,
        "dense": [0.5, -1.0],
        "sparse": {"indices": [1, 2], "values": [0.1, 0.2]},
        "multivector": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
    }
    body = json.dumps({"model": "m", "items": [item]}).encode()
    (r,) = wire.decode_encode_response(wire.unpack(body, "application/json"))
    assert r["id"] is None and r["truncated"] is True
    assert r["dense"].dtype == np.float32 and r["dense"].tolist() == [0.5, -1.0]
    assert r["sparse"]["indices"].dtype == np.int32
    assert r["multivector"].shape == (3, 2) and r["multivector"].dtype == np.float32
    empty = wire.decode_encode_item({"token_count": 0, "truncated": False, "multivector": []})
    assert empty["multivector"].shape == (0, 0)


def test_wire_rejects_inconsistent_dense() -> None:
    item = {"token_count": 1, "truncated": False, "dense": {"dims": 4, "data": b"\0" * 12}}
    with pytest.raises(SIEError):
        wire.decode_encode_item(item)


def test_encode_request_body() -> None:
    body = msgpack.unpackb(
        wire.encode_request([Item(text="a", id="1"), Item(text="b")], ["dense", "sparse"], {"lora_id": "x"})
    )
    assert body == {
        "items": [{"text": "a", "id": "1"}, {"text": "b"}],
        "params": {"output_types": ["dense", "sparse"], "options": {"lora_id": "x"}},
    }
    assert msgpack.unpackb(wire.encode_request([Item("a")])) == {"items": [{"text": "a"}], "params": {}}


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, InvalidRequestError),
        (401, UnauthorizedError),
        (404, ModelNotFoundError),
        (413, PayloadTooLargeError),
        (429, OverloadedError),
        (500, InternalServerError),
        (502, InternalServerError),
        (503, ModelUnavailableError),
        (504, GatewayTimeoutError),
        (418, SIEServerError),
    ],
)
def test_error_mapping(status: int, cls: type[SIEServerError]) -> None:
    err = {"error": {"code": "some_code", "message": "items[3].text: required"}}
    for body in (json.dumps(err).encode(), msgpack.packb(err), err):
        e = error_from_response(status, body)
        assert type(e) is cls and e.status == status
        assert e.code == "some_code" and e.message == "items[3].text: required"
        assert isinstance(e, SIEError)


def test_error_mapping_non_json_body() -> None:
    e = error_from_response(502, b"<html>Bad Gateway</html>")
    assert isinstance(e, InternalServerError) and e.code == "internal" and "Bad Gateway" in e.message
    e = error_from_response(404, b"")
    assert isinstance(e, ModelNotFoundError) and e.code == "model_not_found" and e.message == "HTTP 404"
    e = error_from_response(400, b'{"error": "flat string"}')
    assert isinstance(e, InvalidRequestError) and e.code == "invalid_request"
    e = error_from_response(429, b"busy", retry_after="2")
    assert isinstance(e, OverloadedError) and e.retry_after == 2.0
    assert error_from_response(429, b"", retry_after="Wed, 21 Oct 2015 07:28:00 GMT").retry_after is None


def test_documented_usage(server: FakeServer) -> None:
    documents = ["first doc", "second doc here", "third"]
    client = SIEClient("http://localhost:8080", transport=httpx.MockTransport(server))
    dense_results = client.encode("BAAI/bge-m3", [Item(text=d) for d in documents])
    hybrid_results = client.encode("BAAI/bge-m3", [Item(text=d) for d in documents], output_types=["dense", "sparse"])
    legal_results = client.encode(
        "BAAI/bge-m3", [Item(text=d) for d in documents], options={"lora_id": "org/bge-m3-legal-lora"}
    )
    assert [r["dense"].tolist() for r in dense_results] == [vec(d).tolist() for d in documents]
    assert "sparse" not in dense_results[0] and "sparse" in hybrid_results[2]
    assert len(legal_results) == 3
    req = server.requests[0]
    assert req.method == "POST" and req.url.raw_path == b"/v1/encode/BAAI/bge-m3"
    assert req.headers["accept"] == "application/msgpack"
    assert server.bodies[2]["params"]["options"] == {"lora_id": "org/bge-m3-legal-lora"}
    client.close()


def test_single_item_and_str(server: FakeServer) -> None:
    with SIEClient(transport=httpx.MockTransport(server)) as c:
        r = c.encode("m", Item(text="x", id="7"))
        assert isinstance(r, dict) and r["id"] == "7"
        assert c.encode("m", "hello")["dense"].tolist() == vec("hello").tolist()
        assert [r["dense"].tolist() for r in c.encode("m", ["a", Item(text="b")])] == [
            vec("a").tolist(),
            vec("b").tolist(),
        ]
        assert c.encode("m", []) == []
        with pytest.raises(TypeError):
            c.encode("m", [1])  # type: ignore[list-item]
    assert server.bodies[0]["items"] == [{"text": "x", "id": "7"}]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_sync_split_preserves_order(server: FakeServer, concurrency: int) -> None:
    texts = [f"text {i}" for i in range(23)]
    with SIEClient(transport=httpx.MockTransport(server), max_items_per_request=5, max_concurrency=concurrency) as c:
        results = c.encode("m", [Item(text=t, id=str(i)) for i, t in enumerate(texts)])
    assert sorted(len(b["items"]) for b in server.bodies) == [3, 5, 5, 5, 5]
    assert [r["id"] for r in results] == [str(i) for i in range(23)]
    assert [r["dense"].tolist() for r in results] == [vec(t).tolist() for t in texts]


def test_async_split_preserves_order_and_bounds_concurrency() -> None:
    in_flight = peak = 0
    fake = FakeServer()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        if request.method == "GET":
            return fake(request)
        in_flight += 1
        peak = max(peak, in_flight)
        body = msgpack.unpackb(await request.aread())
        await asyncio.sleep(0.01 * (len(body["items"]) % 3))  # finish out of order
        in_flight -= 1
        return fake(request)

    async def main() -> list[Any]:
        async with SIEAsyncClient(
            transport=httpx.MockTransport(handler), max_items_per_request=4, max_concurrency=3
        ) as c:
            assert await c.health()
            texts = [f"t{i}" for i in range(30)]
            results = await c.encode("m", [Item(text=t, id=t) for t in texts])
            assert (await c.encode("m", "solo"))["id"] is None
            return [(r["id"], r["dense"].tolist()) for r in results] == [(t, vec(t).tolist()) for t in texts]

    assert asyncio.run(main())
    assert len([b for b in fake.bodies if len(b["items"]) > 1]) == 8
    assert 1 < peak <= 3


def test_error_responses_raise(server: FakeServer) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if "overloaded" in request.url.path:
            body = msgpack.packb({"error": {"code": "overloaded", "message": "queue full"}})
            return httpx.Response(429, content=body, headers={"Retry-After": "3", "Content-Type": "application/msgpack"})
        if "missing" in request.url.path:
            return httpx.Response(404, json={"error": {"code": "model_not_found", "message": "no model x/missing"}})
        return httpx.Response(500, text="Internal Server Error")

    with SIEClient(transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(OverloadedError) as ei:
            c.encode("x/overloaded", ["a"])
        assert ei.value.retry_after == 3.0 and ei.value.message == "queue full"
        with pytest.raises(ModelNotFoundError):
            c.encode("x/missing", "a")
        with pytest.raises(InternalServerError):
            c.models()
        assert c.health() is False


def test_split_fails_if_any_chunk_fails() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        items = msgpack.unpackb(request.content)["items"]
        if items[0]["text"] == "bad":
            return httpx.Response(400, json={"error": {"code": "invalid_request", "message": "items[0].text"}})
        return FakeServer()(request)

    with SIEClient(transport=httpx.MockTransport(handler), max_items_per_request=2) as c:
        with pytest.raises(InvalidRequestError):
            c.encode("m", ["a", "b", "bad", "c", "d"])


def test_connection_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with SIEClient(transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(SIEConnectionError):
            c.encode("m", "a")
        assert c.health() is False


def test_auth_header_and_env(monkeypatch: pytest.MonkeyPatch, server: FakeServer) -> None:
    monkeypatch.delenv("SIE_API_KEY", raising=False)
    with SIEClient(transport=httpx.MockTransport(server)) as c:
        c.health()
    assert "authorization" not in server.requests[-1].headers
    with SIEClient(api_key="k1", transport=httpx.MockTransport(server)) as c:
        c.health()
    assert server.requests[-1].headers["authorization"] == "Bearer k1"
    monkeypatch.setenv("SIE_API_KEY", "k2")
    with SIEClient(transport=httpx.MockTransport(server)) as c:
        c.health()
    assert server.requests[-1].headers["authorization"] == "Bearer k2"


def test_models_and_score(server: FakeServer) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v1/score/"):
            body = msgpack.unpackb(request.content)
            assert request.url.raw_path == b"/v1/score/BAAI/bge-reranker-v2-m3"
            assert body == {"query": {"text": "q"}, "items": [{"text": "a", "id": "A"}, {"text": "b"}],
                            "options": {}, "top_k": 1}
            payload = {"model": "BAAI/bge-reranker-v2-m3", "scores": [{"item_id": "A", "score": 0.9, "rank": 0}]}
            return httpx.Response(200, content=msgpack.packb(payload), headers={"Content-Type": "application/msgpack"})
        return server(request)

    with SIEClient(transport=httpx.MockTransport(handler)) as c:
        assert c.models() == [{"id": "BAAI/bge-m3", "state": "loaded"}]
        res = c.score("BAAI/bge-reranker-v2-m3", "q", [Item(text="a", id="A"), "b"], top_k=1)
    assert res == {"model": "BAAI/bge-reranker-v2-m3", "scores": [{"item_id": "A", "score": 0.9, "rank": 0}]}


def test_invalid_config() -> None:
    with pytest.raises(ValueError):
        SIEClient(max_items_per_request=0)
