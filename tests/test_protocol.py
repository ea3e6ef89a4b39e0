"""SIE's protocol details and hostile input, against a real server process (BGE-M3-shaped test
model and all-MiniLM-L6-v2). The public SDK's own run is tests/test_sie_public.py."""

from __future__ import annotations

import json
import socket

import httpx
import msgpack
import numpy as np
import pytest

from sie_sdk import SIEClient
from sie_sdk.types import Item

pytestmark = pytest.mark.slow
M3 = "BAAI/bge-m3"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ROUTES = [(f"/v1/encode/{M3}", lambda opts: {"items": [{"text": "x"}], "params": {"options": opts}}),
          (f"/v1/score/{M3}", lambda opts: {"query": {"text": "q"}, "items": [{"text": "x"}], "options": opts}),
          ("/v1/embeddings", lambda opts: {"model": MINILM, "input": "x"})]


def post(server, path: str, body: bytes | dict, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


def error(r: httpx.Response, route: str = "") -> dict:
    """The error object (SIE's envelope; OpenAI's on /v1/embeddings), checked against the header."""
    body = r.json()
    err = body["error"] if route == "/v1/embeddings" else body["detail"]
    assert r.headers["x-sie-error-code"] == err["code"]
    return err


def test_models_listing_serves_sie_and_openai_clients(bge_m3_server) -> None:
    from openai import OpenAI

    body = httpx.get(f"{bge_m3_server.url}/v1/models").json()
    names = {m["name"] for m in body["models"]}
    assert {M3, MINILM} <= names and body["object"] == "list"
    assert {m["id"] for m in body["data"]} == names
    listed = OpenAI(base_url=f"{bge_m3_server.url}/v1", api_key="unused").models.list()
    assert {m.id for m in listed.data} == names
    one = httpx.get(f"{bge_m3_server.url}/v1/models/{MINILM}").json()
    assert one["dims"] == {"dense": 384} and one["outputs"] == ["dense"] and one["dtype"] == "float32"
    assert one["state"] == "loaded" and one["loaded"] is True and "default" in one["profiles"]
    r = httpx.get(f"{bge_m3_server.url}/v1/models/no/such-model")
    assert r.status_code == 404 and error(r)["code"] == "MODEL_NOT_FOUND"


def test_health_routes_and_version_header(bge_m3_server) -> None:
    r = httpx.get(f"{bge_m3_server.url}/health")
    assert r.status_code == 200 and r.json()["type"] == "worker" and r.json()["sie_protocol"] == "0.10.1"
    assert httpx.get(f"{bge_m3_server.url}/livez").text == "ok"
    assert r.headers["x-sie-server-version"] == "0.10.1"


def test_sie_options_are_honoured_or_refused_by_name(bge_m3_server) -> None:
    url = f"/v1/encode/{M3}"
    base = {"items": [{"text": "hello world"}]}
    plain = post(bge_m3_server, url, base).json()["items"][0]["dense"]["values"]
    for opts in ({"profile": "default"}, {"normalize": True}, {"overflow_policy": "truncate_text"}):
        got = post(bge_m3_server, url, {**base, "params": {"options": opts}}).json()["items"][0]["dense"]["values"]
        np.testing.assert_allclose(got, plain, atol=1e-6)
    # normalize: false: the CLS vector before the L2 step (tests/test_equivalence.py checks
    # it against FlagEmbedding); the same direction as the default
    raw = post(bge_m3_server, url, {**base, "params": {"options": {"normalize": False}}}).json()
    raw = np.array(raw["items"][0]["dense"]["values"])
    assert abs(np.linalg.norm(raw) - 1) > 0.01
    np.testing.assert_allclose(raw / np.linalg.norm(raw), plain, atol=1e-6)
    long = {"items": [{"text": "word " * 9000}], "params": {"options": {"overflow_policy": "error"}}}
    r = post(bge_m3_server, url, long)
    assert r.status_code == 400 and error(r)["code"] == "INPUT_TOO_LONG"
    for opts, field in (({"muvera": {"k_sim": 4}}, "params.options.muvera"), ({"profile": "fast"}, "Profile 'fast' not found. Available: ['default', 'dense', "),
                        ({"normalize": "no"}, "params.options.normalize"), ({"shout": 1}, "params.options.shout"),
                        ({"overflow_policy": "drop"}, "params.options.overflow_policy")):
        r = post(bge_m3_server, url, {**base, "params": {"options": opts}})
        assert r.status_code == 400 and error(r)["code"] == "INVALID_INPUT" and field in error(r)["message"], r.text
    r = post(bge_m3_server, url, {**base, "params": {"output_dtype": "int4"}})
    assert r.status_code == 400 and "params.output_dtype" in error(r)["message"]
    # params.instruction is the template's instruction, as options.instruction
    a = post(bge_m3_server, url, {**base, "params": {"instruction": "Find: "}}).json()["items"][0]
    b = post(bge_m3_server, url, {**base, "params": {"options": {"instruction": "Find: "}}}).json()["items"][0]
    assert a["dense"]["values"] == b["dense"]["values"] and a["token_count"] > 4


def test_score_instruction_ids_and_usage(bge_m3_server) -> None:
    body = {"query": {"text": "q", "id": "Q"}, "items": [{"text": "a"}, {"text": "b", "id": "B"}]}
    r = post(bge_m3_server, f"/v1/score/{M3}", body).json()
    assert r["query_id"] == "Q" and {s["item_id"] for s in r["scores"]} == {"item-0", "B"}
    assert r["usage"]["input_tokens"] > 0
    with_instruction = post(bge_m3_server, f"/v1/score/{M3}", {**body, "instruction": "Find: "}).json()
    assert with_instruction["scores"] != r["scores"]


# ---------------------------------------------------------------- hostile input (issue 11)

@pytest.mark.parametrize("value", ["nan", "1e400", "-inf", "0", "-3"])
@pytest.mark.parametrize("route, body", ROUTES, ids=["encode", "score", "embeddings"])
def test_non_finite_deadlines_are_400_on_every_route(bge_m3_server, route, body, value) -> None:
    r = post(bge_m3_server, route, body({}), {"x-request-timeout": value})
    assert r.status_code == 400 and "x-request-timeout" in error(r, route)["message"], r.text
    if route != "/v1/embeddings":  # the same through options.timeout_s
        literal = {"nan": "NaN", "-inf": "-Infinity"}.get(value, value)
        text = json.dumps(body({"timeout_s": "T"})).replace('"T"', literal)
        r = post(bge_m3_server, route, text.encode())
        assert r.status_code == 400 and "timeout_s" in error(r, route)["message"], r.text
    huge = json.dumps(body({"timeout_s": 10**30})).encode()
    assert post(bge_m3_server, route, huge).status_code in (200, 400)


@pytest.mark.parametrize("weights", ['{"dense": 1e400}', '{"dense": 1e308, "sparse": 1e308, "colbert": 1e308}',
                                     '{"dense": 1000000000000000000000000000000}', '{"dense": NaN}'])
def test_extreme_score_weights_never_give_nan_or_500(bge_m3_server, weights) -> None:
    body = ('{"query": {"text": "q"}, "items": [{"text": "a"}, {"text": "b"}], "options": {"score_mode": "hybrid", "score_weights": %s}}'
            % weights).encode()
    r = post(bge_m3_server, f"/v1/score/{M3}", body)
    assert r.status_code in (200, 400), r.text
    json.loads(r.content, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    if r.status_code == 200:
        assert all(np.isfinite(s["score"]) for s in r.json()["scores"])


@pytest.mark.parametrize("route, body", [
    (f"/v1/encode/{M3}", b'{"items": [{"text": "a\\ud800b"}]}'),
    (f"/v1/encode/{MINILM}", b'{"items": [{"text": "\\udfff"}]}'),
    (f"/v1/score/{M3}", b'{"query": {"text": "\\ud800"}, "items": [{"text": "a"}]}'),
    (f"/v1/score/{M3}", b'{"query": {"text": "q"}, "items": [{"text": "a"}, {"text": "\\ud800"}]}'),
    ("/v1/embeddings", b'{"model": "' + MINILM.encode() + b'", "input": ["ok", "\\ud800"]}'),
    # in an option's value (the tokenizer would fail on it: was a 500) or name
    (f"/v1/encode/{MINILM}", b'{"items": [{"text": "a"}], "params": {"options": '
                             b'{"doc_template": "\\ud800 {text}"}}}'),
    (f"/v1/encode/{M3}", b'{"items": [{"text": "a"}], "params": {"options": {"instruction": "\\udfff"}}}'),
    (f"/v1/score/{M3}", b'{"query": {"text": "q"}, "items": [{"text": "a"}], "options": {"\\ud800": 1}}'),
])
def test_lone_surrogates_are_400_naming_the_field(bge_m3_server, route, body) -> None:
    r = post(bge_m3_server, route, body)
    assert r.status_code == 400 and "surrogate" in error(r, route)["message"], r.text


@pytest.mark.parametrize("item_id", ["true", "123456789012345678901234567890", "1.5", '{"a": 1}'])
def test_item_ids_must_be_strings(bge_m3_server, item_id) -> None:
    r = post(bge_m3_server, f"/v1/encode/{M3}", ('{"items": [{"text": "a", "id": %s}]}' % item_id).encode())
    assert r.status_code == 400 and "items[0].id" in error(r)["message"]


def test_errors_and_logs_do_not_echo_huge_values(bge_m3_server) -> None:
    logged = len(bge_m3_server.output())
    huge = "x" * 30_000_000
    r = post(bge_m3_server, f"/v1/encode/{M3}", {"items": [{"text": "a"}], "params": {"options": {"lora_id": huge}}})
    assert r.status_code == 400 and len(r.content) < 3000, len(r.content)
    r = post(bge_m3_server, f"/v1/encode/{M3}", {"items": [{"text": "a"}], "params": {"options": {huge[:100_000]: 1}}})
    assert r.status_code == 400 and len(r.content) < 3000
    lines = bge_m3_server.output()[logged:].splitlines()
    assert lines and max(map(len, lines)) < 5000


def test_keep_alive_survives_every_kind_of_error(bge_m3_server) -> None:
    """One connection: a 400, a 404, a 413 (body refused unread), a 401-free route, then a
    valid request, all answered on the same socket."""
    with socket.create_connection(("127.0.0.1", bge_m3_server.port), timeout=30) as s, s.makefile("rb") as f:
        def send(path: str, body: bytes, ctype: str = "application/json") -> int:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            status = int(f.readline().split()[1])
            length = 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                assert not line.lower().startswith(b"connection: close"), line
            f.read(length)
            return status

        assert send(f"/v1/encode/{M3}", b'{"items": []}') == 400
        assert send("/v1/encode/no/model", b'{"items": [{"text": "a"}]}') == 404
        assert send(f"/v1/encode/{M3}", msgpack.packb({"items": [{"text": 1}]}), "application/msgpack") == 400
        assert send(f"/v1/score/{M3}", b'{"query": {"text": "\\ud800"}, "items": [{"text": "a"}]}') == 400
        assert send(f"/v1/encode/{M3}", b'{"items": [{"text": "fine"}]}') == 200


def test_our_sdk_gets_typed_errors(bge_m3_server) -> None:
    from sie_sdk import InputTooLongError, ModelNotFoundError

    with SIEClient(bge_m3_server.url) as c:
        with pytest.raises(InputTooLongError):
            c.encode(M3, Item(text="word " * 9000), options={"truncate": False})
        with pytest.raises(ModelNotFoundError) as err:
            c.get_model("no/such")
        assert err.value.code == "MODEL_NOT_FOUND"
        assert c.get_model(M3)["dims"]["sparse"] == 250002
