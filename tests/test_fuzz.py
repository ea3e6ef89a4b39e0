"""Property-based fuzzing of every route's body (JSON and msgpack) against a real server.

For any body, including non-finite numbers, lone surrogates, huge integers and oversized
values: never a 500, an error body is always JSON with SIE's envelope, a 200 JSON body is
strict JSON (no NaN), and a valid request on the SAME keep-alive connection is answered
afterwards. Examples are derandomized so CI runs the same ones every time.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

ROUTES = ["/v1/encode/BAAI/bge-m3", "/v1/score/BAAI/bge-m3", "/v1/embeddings",
          "/v1/encode/sentence-transformers/all-MiniLM-L6-v2",
          "/v1/models/BAAI/bge-m3/adapters/org/x"]
VALID = b'{"items": [{"text": "still answered"}]}'

texts = st.one_of(st.text(max_size=40), st.sampled_from(["\ud800", "a\udfffb", "<s>", "x" * 3000]))
numbers = st.one_of(st.integers(min_value=-10**30, max_value=10**30),
                    st.floats(allow_nan=True, allow_infinity=True), st.just(10**400))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)
item = st.fixed_dictionaries({"text": st.one_of(texts, values)},
                             optional={"id": values, "metadata": values, "images": values})
options = st.dictionaries(st.sampled_from(
    ["truncate", "is_query", "instruction", "lora_id", "timeout_s", "output_dtype", "profile", "normalize",
     "overflow_policy", "muvera", "weights", "score_type", "score_mode", "score_weights",
     "activation", "bogus"]), values, max_size=4)
encode_body = st.fixed_dictionaries({"items": st.one_of(st.lists(item, max_size=3), values)},
                                    optional={"params": st.one_of(values, st.fixed_dictionaries(
                                        {}, optional={"output_types": st.one_of(values, st.lists(st.sampled_from(
                                            ["dense", "sparse", "multivector", "colour"]), max_size=3)),
                                                      "output_dtype": values, "instruction": values,
                                                      "options": options}))})
score_body = st.fixed_dictionaries({"query": st.one_of(item, values), "items": st.one_of(st.lists(item, max_size=3), values)},
                                   optional={"options": st.one_of(options, values), "top_k": values,
                                             "instruction": values})
openai_body = st.fixed_dictionaries({"model": st.one_of(st.just("sentence-transformers/all-MiniLM-L6-v2"), values),
                                     "input": st.one_of(texts, st.lists(texts, max_size=3), values)},
                                    optional={"encoding_format": values, "dimensions": values})
bodies = st.one_of(encode_body, score_body, openai_body, values)


def _serialize(body, fmt: str) -> bytes | None:
    if fmt == "json":
        return json.dumps(body).encode()  # NaN, Infinity and \ud800 escapes included
    try:
        return msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
        return None  # not representable in msgpack (huge ints, lone surrogates)


def _exchange(sock: socket.socket, reader, path: str, body: bytes, ctype: str, extra: bytes = b"") -> tuple[int, dict, bytes]:
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype.encode()
                 + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)
    status_line = reader.readline()
    assert status_line, "the server closed the connection"
    status = int(status_line.split()[1])
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, reader.read(int(headers.get("content-length", 0)))


def _strict_json(raw: bytes):
    def no_constants(name: str):
        raise ValueError(f"non-JSON constant {name}")
    return json.loads(raw, parse_constant=no_constants)


@pytest.fixture(scope="module")
def connection(bge_m3_server):
    sock = socket.create_connection(("127.0.0.1", bge_m3_server.port), timeout=60)
    yield sock, sock.makefile("rb")
    sock.close()


@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(route=st.sampled_from(ROUTES), body=bodies, fmt=st.sampled_from(["json", "msgpack"]),
       timeout=st.one_of(st.none(), st.sampled_from(["nan", "1e400", "-1", "0", "abc", "inf", "30"])))
def test_no_body_gives_a_500_or_breaks_the_connection(connection, route, body, fmt, timeout) -> None:
    sock, reader = connection
    raw = _serialize(body, fmt)
    if raw is None:
        return
    extra = b"" if timeout is None else b"X-Request-Timeout: " + timeout.encode() + b"\r\n"
    status, headers, content = _exchange(sock, reader, route, raw, f"application/{fmt}", extra)
    assert status != 500 and status < 600, (status, content[:500])
    if status >= 400:
        err = _strict_json(content)
        envelope = err["error"] if route == "/v1/embeddings" else err["detail"]
        assert envelope["code"] and envelope["message"], err
        assert headers["x-sie-error-code"] == envelope["code"]
    elif headers.get("content-type", "").startswith("application/json"):
        _strict_json(content)
    assert headers.get("connection") != "close", headers
    status, _, content = _exchange(sock, reader, "/v1/encode/sentence-transformers/all-MiniLM-L6-v2", VALID,
                                   "application/json")
    assert status == 200, content[:300]


def test_a_client_that_closes_mid_body_is_a_499_not_a_500(bge_m3_server) -> None:
    logged = len(bge_m3_server.output())
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", bge_m3_server.port)) as s:
            s.sendall(b"POST /v1/encode/BAAI/bge-m3 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{bge_m3_server.url}/metrics").text
        if 'route="encode",status="499"' in metrics:
            break
        time.sleep(0.2)
    assert 'route="encode",status="500"' not in metrics
    assert "Traceback" not in bge_m3_server.output()[logged:]
