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
    AdapterLoadingError,
    DeadlineExceededError,
    GatewayTimeoutError,
    InputTooLongError,
    InternalServerError,
    InvalidRequestError,
    Item,
    ModelLoadFailedError,
    ModelLoadingError,
    ModelNotFoundError,
    ModelUnavailableError,
    OverloadedError,
    PayloadTooLargeError,
    ResourceExhaustedError,
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


def nd(a: np.ndarray) -> dict[bytes, Any]:
    """An array as msgpack-numpy, as docs/API.md (and SIE's server) put it on the wire."""
    return {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": list(a.shape), b"data": a.tobytes()}


def server_item(item: dict[str, Any], output_types: list[str]) -> dict[str, Any]:
    """Encode one item the way the server does (docs/API.md): msgpack-numpy arrays."""
    text = item["text"]
    out: dict[str, Any] = {"token_count": len(text.split()), "truncated": False}
    if item.get("id") is not None:
        out["id"] = item["id"]
    if "dense" in output_types:
        out["dense"] = {"dims": DIM, "dtype": "float32", "values": nd(vec(text).astype("<f4"))}
    if "sparse" in output_types:
        out["sparse"] = {
            "dims": 250002, "dtype": "float32",
            "indices": nd(np.array([3, 70000, 5], dtype="<i4")),
            "values": nd(np.array([0.5, 0.25, 0.125], dtype="<f4")),
        }
    if "multivector" in output_types:
        mv = np.stack([vec(text + str(i)) for i in range(3)]).astype("<f4")
        out["multivector"] = {"token_dims": DIM, "num_tokens": 3, "dtype": "float32", "values": nd(mv)}
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
        "token_count": 1,
        "truncated": True,
        "dense": {"dims": 2, "dtype": "float32", "values": [0.5, -1.0]},
        "sparse": {"dims": 9, "dtype": "float32", "indices": [1, 2], "values": [0.1, 0.2]},
        "multivector": {"token_dims": 2, "num_tokens": 3, "dtype": "float32",
                        "values": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]},
    }
    body = json.dumps({"model": "m", "items": [item]}).encode()
    (r,) = wire.decode_encode_response(wire.unpack(body, "application/json"))
    assert r["id"] is None and r["truncated"] is True
    assert r["dense"].dtype == np.float32 and r["dense"].tolist() == [0.5, -1.0]
    assert r["sparse"]["indices"].dtype == np.int32
    assert r["multivector"].shape == (3, 2) and r["multivector"].dtype == np.float32
    empty = wire.decode_encode_item({"token_count": 0, "truncated": False, "multivector": {
        "token_dims": 2, "num_tokens": 0, "dtype": "float32", "values": []}})
    assert empty["multivector"].shape == (0, 0)
    int8 = wire.decode_encode_item({"dense": {"dims": 3, "dtype": "int8", "values": [-127, 0, 5]}})
    assert int8["dense"].dtype == np.int8 and int8["dense"].tolist() == [-127, 0, 5]


@pytest.mark.parametrize("bad", [
    {b"nd": True, b"type": "<f4", b"kind": b"", b"shape": [4], b"data": b"\0" * 12},  # short data
    {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1], b"data": b"\0" * 8},  # would unpickle
    {b"nd": True, b"type": "V8", b"kind": b"V", b"shape": [1], b"data": b"\0" * 8},  # structured
])
def test_wire_rejects_malformed_arrays(bad: dict) -> None:
    body = msgpack.packb({"model": "m", "items": [{"dense": {"dims": 4, "values": bad}}]}, use_bin_type=True)
    with pytest.raises(SIEError):
        wire.unpack(body, "application/msgpack")


def test_encode_request_body() -> None:
    body = msgpack.unpackb(
        wire.encode_request([Item(text="a", id="1"), Item(text="b")], ["dense", "sparse"], {"lora_id": "x"})
    )
    assert body == {
        "items": [{"text": "a", "id": "1"}, {"text": "b"}],
        "params": {"output_types": ["dense", "sparse"], "options": {"lora_id": "x"}},
    }
    assert msgpack.unpackb(wire.encode_request([Item("a")])) == {"items": [{"text": "a"}], "params": {}}
    body = msgpack.unpackb(wire.encode_request([Item("a")], output_dtype="int8", instruction="Find"))
    assert body["params"] == {"output_dtype": "int8", "instruction": "Find"}


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
    for key in ("detail", "error"):  # SIE's envelope, and OpenAI's
        err = {key: {"code": "some_code", "message": "items[3].text: required"}}
        for body in (json.dumps(err).encode(), msgpack.packb(err), err):
            e = error_from_response(status, body)
            assert type(e) is cls and e.status == status
            assert e.code == "some_code" and e.message == "items[3].text: required"
            assert isinstance(e, SIEError)


@pytest.mark.parametrize(("status", "code", "cls"), [
    (400, "INVALID_INPUT", InvalidRequestError),
    (400, "INPUT_TOO_LONG", InputTooLongError),
    (413, "INPUT_TOO_LONG", PayloadTooLargeError),
    (408, "DEADLINE_EXCEEDED", DeadlineExceededError),
    (503, "QUEUE_FULL", OverloadedError),
    (503, "MODEL_LOADING", ModelLoadingError),
    (502, "MODEL_LOAD_FAILED", ModelLoadFailedError),
    (503, "LORA_LOADING", AdapterLoadingError),
    (503, "RESOURCE_EXHAUSTED", ResourceExhaustedError),
])
def test_error_codes_pick_the_class(status: int, code: str, cls: type[SIEServerError]) -> None:
    e = error_from_response(status, {"detail": {"code": code, "message": "m", "attempts": 2}})
    assert type(e) is cls and e.code == code and e.detail["attempts"] == 2
    # the X-SIE-Error-Code header names the code even when the body does not
    assert type(error_from_response(status, b"", code_header=code)) is cls


def test_error_mapping_non_json_body() -> None:
    e = error_from_response(502, b"<html>Bad Gateway</html>")
    assert isinstance(e, InternalServerError) and e.code == "INTERNAL_ERROR" and "Bad Gateway" in e.message
    e = error_from_response(404, b"")
    assert isinstance(e, ModelNotFoundError) and e.code == "MODEL_NOT_FOUND" and e.message == "HTTP 404"
    e = error_from_response(400, b'{"detail": "flat string"}')
    assert isinstance(e, InvalidRequestError) and e.code == "INVALID_INPUT" and e.message == "flat string"
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
            body = json.dumps({"detail": {"code": "QUEUE_FULL", "message": "queue full"}})
            return httpx.Response(503, content=body, headers={"Retry-After": "3"})
        if "missing" in request.url.path:
            return httpx.Response(404, json={"detail": {"code": "MODEL_NOT_FOUND", "message": "no model x/missing"}})
        return httpx.Response(500, text="Internal Server Error")

    with SIEClient(transport=httpx.MockTransport(handler), max_retries=0) as c:
        with pytest.raises(OverloadedError) as ei:
            c.encode("x/overloaded", ["a"])
        assert ei.value.retry_after == 3.0 and ei.value.message.startswith("queue full")
        with pytest.raises(ModelNotFoundError):
            c.encode("x/missing", "a")
        with pytest.raises(InternalServerError):
            c.models()
        assert c.health() is False


def test_split_fails_if_any_chunk_fails() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        items = msgpack.unpackb(request.content)["items"]
        if items[0]["text"] == "bad":
            return httpx.Response(400, json={"detail": {"code": "INVALID_INPUT", "message": "items[0].text"}})
        return FakeServer()(request)

    with SIEClient(transport=httpx.MockTransport(handler), max_items_per_request=2) as c:
        with pytest.raises(InvalidRequestError) as ei:
            c.encode("m", ["a", "b", "bad", "c", "d"])
    # the chunks that succeeded are not lost: they come with the error, in input order
    partial = ei.value.partial
    assert [p is None for p in partial] == [False, False, True, True, False]
    assert partial[4]["dense"].tolist() == vec("d").tolist()
    assert "1 of 3 requests failed; 3 of 5 items encoded" in ei.value.message


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
        assert c.models() == c.list_models() == [{"id": "BAAI/bge-m3", "state": "loaded"}]
        res = c.score("BAAI/bge-reranker-v2-m3", "q", [Item(text="a", id="A"), "b"], top_k=1)
    assert res == {"model": "BAAI/bge-reranker-v2-m3", "scores": [{"item_id": "A", "score": 0.9, "rank": 0}]}


def test_invalid_config() -> None:
    with pytest.raises(ValueError):
        SIEClient(max_items_per_request=0)


def test_transient_refusals_are_retried_within_bounds(server: FakeServer) -> None:
    """503 MODEL_LOADING / QUEUE_FULL and 429 are retried (Retry-After honoured); other errors
    are not; the retries stop at max_retries."""
    refusals: list[tuple[int, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if refusals:
            status, code = refusals.pop(0)
            return httpx.Response(status, json={"detail": {"code": code, "message": "wait"}},
                                  headers={"Retry-After": "0"})
        return server(request)

    with SIEClient(transport=httpx.MockTransport(handler), max_retries=3) as c:
        refusals[:] = [(503, "MODEL_LOADING"), (503, "QUEUE_FULL"), (429, "RATE_LIMIT")]
        assert c.encode("m", "a")["dense"].tolist() == vec("a").tolist()
        assert refusals == [] and len(server.requests) == 1
        refusals[:] = [(503, "MODEL_LOADING")] * 5
        with pytest.raises(ModelLoadingError):
            c.encode("m", "a")
        assert len(refusals) == 1  # 1 try + 3 retries
        refusals[:] = [(502, "MODEL_LOAD_FAILED"), (400, "INPUT_TOO_LONG")]
        with pytest.raises(ModelLoadFailedError):
            c.encode("m", "a")
        with pytest.raises(InputTooLongError):
            c.encode("m", "a")
        assert refusals == []


def test_async_retries_and_partial_results() -> None:
    fake, calls = FakeServer(), {"n": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(503, json={"detail": {"code": "LORA_LOADING", "message": "wait"}},
                                  headers={"Retry-After": "0"})
        if msgpack.unpackb(request.content)["items"][0]["text"] == "bad":
            return httpx.Response(400, json={"detail": {"code": "INVALID_INPUT", "message": "no"}})
        return fake(request)

    async def main() -> None:
        async with SIEAsyncClient(transport=httpx.MockTransport(handler), max_items_per_request=1,
                                  max_concurrency=1) as c:
            assert (await c.encode("m", ["x"]))[0]["dense"].tolist() == vec("x").tolist()
            with pytest.raises(InvalidRequestError) as ei:
                await c.encode("m", ["a", "bad", "c"])
            assert [p is None for p in ei.value.partial] == [False, True, False]

    asyncio.run(main())


def test_sie_style_dict_items_and_keywords(server: FakeServer) -> None:
    with SIEClient(transport=httpx.MockTransport(server)) as c:
        r = c.encode("m", [{"text": "a", "id": "1"}], output_dtype="float16", instruction="Find", is_query=True)
    assert r[0]["id"] == "1"
    assert server.bodies[0]["params"] == {"instruction": "Find", "output_dtype": "float16",
                                          "options": {"is_query": True}}
