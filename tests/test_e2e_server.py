"""End to end: a real `sie-server` process on a loopback port, driven by the real SDK."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
import reference
import torch
from test_equivalence import assert_matches_flag
from texts import SHORT_TEXTS, TEXTS

from sie_sdk import SIEAsyncClient, SIEClient
from sie_sdk.errors import (InvalidRequestError, ModelNotFoundError, ModelUnavailableError,
                            PayloadTooLargeError, SIEConnectionError, SIEServerError)
from sie_sdk.types import Item

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


class _Result:
    """Adapts an SDK result dict to the attribute shape `assert_matches_flag` reads."""

    def __init__(self, r: dict) -> None:
        self.dense = r["dense"]
        self.multivector = r["multivector"]
        self.sparse = (r["sparse"]["indices"], r["sparse"]["values"])


@pytest.fixture(scope="module")
def flag_outputs(bge_m3_dir: Path) -> list[dict]:
    return reference.flag_encode(bge_m3_dir, TEXTS, max_length=8192)


def test_readme_snippet_runs_verbatim(bge_m3_server, flag_outputs) -> None:
    documents = TEXTS
    from sie_sdk import SIEClient
    from sie_sdk.types import Item
    client = SIEClient(bge_m3_server.url)
    dense_results = client.encode("BAAI/bge-m3", [Item(text=d) for d in documents])
    hybrid_results = client.encode("BAAI/bge-m3", [Item(text=d) for d in documents],
                                   output_types=["dense", "sparse"])
    assert len(dense_results) == len(hybrid_results) == len(documents)
    for d, h, ref in zip(dense_results, hybrid_results, flag_outputs):
        assert d["dense"].dtype == np.float32 and d["dense"].shape == (64,)
        assert "sparse" not in d and "multivector" not in d
        assert float(d["dense"] @ ref["dense"]) >= 0.99999
        np.testing.assert_array_equal(h["dense"], d["dense"])
        assert set(h["sparse"]["indices"].tolist()) == set(ref["sparse"])


def test_all_three_outputs_equal_the_reference(bge_m3_server, flag_outputs) -> None:
    with SIEClient(bge_m3_server.url, max_items_per_request=16) as client:
        results = client.encode("BAAI/bge-m3", [Item(text=t, id=f"d{i}") for i, t in enumerate(TEXTS)],
                                output_types=["dense", "sparse", "multivector"])
    for i, (r, ref) in enumerate(zip(results, flag_outputs)):
        assert r["id"] == f"d{i}"
        assert r["sparse"]["indices"].dtype == np.int32
        assert r["multivector"].dtype == np.float32
        assert_matches_flag(_Result(r), ref, f"text {i}")
    assert results[-1]["truncated"] and results[-1]["token_count"] == 8192
    assert not results[0]["truncated"]


def test_single_item_in_single_result_out(bge_m3_server) -> None:
    client = SIEClient(bge_m3_server.url)
    one = client.encode("BAAI/bge-m3", Item(text="hello"))
    assert isinstance(one, dict) and one["dense"].shape == (64,)


def test_async_client_matches_sync(bge_m3_server) -> None:
    async def run():
        async with SIEAsyncClient(bge_m3_server.url) as client:
            return await asyncio.gather(*(client.encode("BAAI/bge-m3", [Item(text=t)])
                                          for t in SHORT_TEXTS[:10]))

    results = asyncio.run(run())
    sync = SIEClient(bge_m3_server.url).encode("BAAI/bge-m3", [Item(text=t) for t in SHORT_TEXTS[:10]])
    for (a,), s in zip(results, sync):
        np.testing.assert_allclose(a["dense"], s["dense"], atol=1e-5)


def test_readme_snippet_lora_call(bge_m3_server, legal_lora, bge_m3_dir) -> None:
    """The snippet's third call: the adapter applies per request, equal to peft's merged model."""
    from lora_adapters import m3_reference, tokenize

    documents = SHORT_TEXTS[:12]
    client = SIEClient(bge_m3_server.url)
    legal_results = client.encode("BAAI/bge-m3", [Item(text=d) for d in documents],
                                  options={"lora_id": "org/bge-m3-legal-lora"})
    heads = {h: torch.load(bge_m3_dir / f"{h}.pt", weights_only=True)
             for h in ("colbert_linear", "sparse_linear")}
    want = m3_reference(legal_lora["merged"], heads, tokenize(bge_m3_dir, documents, 8192))
    base = client.encode("BAAI/bge-m3", [Item(text=d) for d in documents])
    for r, w, b in zip(legal_results, want, base):
        assert float(r["dense"] @ w["dense"]) >= 0.99999
        assert float(r["dense"] @ b["dense"]) < 0.9999  # the adapter changed the vectors
    with pytest.raises(SIEServerError) as err:
        client.encode("BAAI/bge-m3", "x", options={"lora_id": "org/no-such-adapter"})
    assert err.value.status == 404 and "org/no-such-adapter" in err.value.message


def test_large_lists_are_split_transparently(bge_m3_server) -> None:
    texts = [f"document number {i}" for i in range(700)]
    client = SIEClient(bge_m3_server.url, max_items_per_request=100)
    results = client.encode("BAAI/bge-m3", [Item(text=t, id=str(i)) for i, t in enumerate(texts)])
    assert [r["id"] for r in results] == [str(i) for i in range(700)]
    single = client.encode("BAAI/bge-m3", Item(text=texts[523]))
    np.testing.assert_allclose(results[523]["dense"], single["dense"], atol=1e-5)


def _post(url: str, body: bytes, ctype: str = "application/json") -> httpx.Response:
    return httpx.post(url, content=body, headers={"content-type": ctype}, timeout=60)


@pytest.mark.parametrize("body, field", [
    (b'{"items": []}', "items"),
    (b'{"items": [{"id": "a"}]}', "items[0].text"),
    (b'{"items": [{"text": 5}]}', "items[0].text"),
    (b'{"items": "hello"}', "items"),
    (b'{"items": [{"text": "a"}], "params": {"output_types": ["dense", "colour"]}}', "colour"),
    (b'{"items": [{"text": "a"}], "params": {"output_types": "dense"}}', "params.output_types"),
    (b'{"items": [{"text": "a"}], "params": {"options": {"truncate": "no"}}}', "params.options.truncate"),
    (b'{"items": [{"text": "a"}], "params": {"options": {"shout": true}}}', "params.options.shout"),
    (b'{"items": [{"text": "a"}', "body"),
    (b'[1, 2]', "body"),
])
def test_bad_requests_get_400_naming_the_field(bge_m3_server, body: bytes, field: str) -> None:
    r = _post(f"{bge_m3_server.url}/v1/encode/BAAI/bge-m3", body)
    assert r.status_code == 400, r.text
    err = r.json()["detail"]
    assert err["code"] == "INVALID_INPUT" and field in err["message"]


def test_bad_msgpack_and_unknown_model(bge_m3_server) -> None:
    r = _post(f"{bge_m3_server.url}/v1/encode/BAAI/bge-m3", b"\xc1\xc1", "application/msgpack")
    assert r.status_code == 400 and r.json()["detail"]["code"] == "INVALID_INPUT"
    r = _post(f"{bge_m3_server.url}/v1/encode/nobody/nothing", b'{"items": [{"text": "a"}]}')
    assert r.status_code == 404 and r.json()["detail"]["code"] == "MODEL_NOT_FOUND"
    with pytest.raises(ModelNotFoundError):
        SIEClient(bge_m3_server.url).encode("nobody/nothing", "a")


def test_truncate_false_is_a_400(bge_m3_server) -> None:
    client = SIEClient(bge_m3_server.url)
    with pytest.raises(InvalidRequestError) as err:
        client.encode("BAAI/bge-m3", [Item(text="short"), Item(text=TEXTS[-1])],
                      options={"truncate": False})
    assert err.value.code == "INPUT_TOO_LONG" and "items[1]" in err.value.message


def test_json_response_and_msgpack_binary_vectors(bge_m3_server) -> None:
    url = f"{bge_m3_server.url}/v1/encode/BAAI/bge-m3"
    body = {"items": [{"text": "hello world"}], "params": {"output_types": ["dense", "sparse", "multivector"]}}
    js = httpx.post(url, json=body, headers={"accept": "application/json"}).json()["items"][0]
    mp = msgpack.unpackb(httpx.post(url, content=msgpack.packb(body), headers={
        "content-type": "application/msgpack", "accept": "application/msgpack"}).content)["items"][0]
    # msgpack-numpy maps, as SIE's SDK decodes them; JSON holds the same keys with lists
    nd = mp["dense"]["values"]
    assert nd[b"nd"] is True and nd[b"type"] == "<f4" and nd[b"kind"] == b"" and nd[b"shape"] == [64]
    assert mp["dense"]["dims"] == js["dense"]["dims"] == 64 and mp["dense"]["dtype"] == "float32"
    np.testing.assert_array_equal(np.frombuffer(nd[b"data"], "<f4"), np.float32(js["dense"]["values"]))
    assert mp["sparse"]["indices"][b"type"] == "<i4" and js["sparse"]["dims"] == 250002
    assert np.frombuffer(mp["sparse"]["indices"][b"data"], "<i4").tolist() == js["sparse"]["indices"]
    mv = mp["multivector"]
    rows = np.frombuffer(mv["values"][b"data"], "<f4").reshape(mv["values"][b"shape"])
    assert rows.shape == (mv["num_tokens"], mv["token_dims"]) == (js["multivector"]["num_tokens"], 64)
    np.testing.assert_array_equal(rows, np.float32(js["multivector"]["values"]))
    assert "id" not in js and js["token_count"] == 5 and js["truncated"] is False  # 3 pieces + <s> and </s>


def test_bad_requests_do_not_disturb_concurrent_ones(bge_m3_server, flag_outputs) -> None:
    url = f"{bge_m3_server.url}/v1/encode/BAAI/bge-m3"
    bad = [b'{"items": [{"text": 1}]}', b"\x00\xff", b'{"items": []}', b'{"items": [{"text": "x"}], "params": {"output_types": ["nope"]}}']

    def good(i: int):
        return i, SIEClient(bge_m3_server.url).encode("BAAI/bge-m3", Item(text=TEXTS[i]),
                                                      output_types=["dense", "sparse", "multivector"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(good, i) for i in range(0, 40, 2)]
        bads = [pool.submit(_post, url, bad[i % len(bad)]) for i in range(40)]
        assert all(b.result().status_code == 400 for b in bads)
        for f in goods:
            i, r = f.result()
            assert_matches_flag(_Result(r), flag_outputs[i], f"text {i}")
    assert httpx.get(f"{bge_m3_server.url}/healthz").status_code == 200


def test_models_health_ready(bge_m3_server) -> None:
    models = {m["id"]: m for m in SIEClient(bge_m3_server.url).models()}
    m3 = models["BAAI/bge-m3"]
    assert m3["state"] == "loaded" and m3["output_types"] == ["dense", "sparse", "multivector"]
    assert m3["max_sequence_length"] == 8192 and m3["dims"]["dense"] == 64
    assert models[MINILM]["dims"] == {"dense": 384}
    assert httpx.get(f"{bge_m3_server.url}/healthz").status_code == 200
    assert httpx.get(f"{bge_m3_server.url}/readyz").status_code == 200


def test_default_server_serves_minilm_offline_and_explains_missing_bge_m3(start_server, tmp_path,
                                                                           minilm_dir) -> None:
    """No arguments: all-MiniLM-L6-v2 from its package; BAAI/bge-m3 registered, weights absent."""
    server = start_server([], env={"HF_HOME": str(tmp_path / "empty-hf-home")})
    client = SIEClient(server.url)
    r = client.encode(MINILM, [Item(text=t) for t in SHORT_TEXTS[:8]])
    ref = reference.st_encode(minilm_dir, SHORT_TEXTS[:8])
    assert min(float(a["dense"] @ b) for a, b in zip(r, ref)) >= 0.9999
    with pytest.raises(ModelUnavailableError) as err:
        client.encode("BAAI/bge-m3", [Item(text="hello")])
    msg = err.value.message
    assert "colbert_linear.pt" in msg and "--model BAAI/bge-m3=" in msg


def test_body_limit_is_413(start_server) -> None:
    server = start_server(["--max-body-bytes", "2000"])
    r = _post(f"{server.url}/v1/encode/{MINILM}", b'{"items": [{"text": "' + b"a" * 5000 + b'"}]}')
    assert r.status_code == 413 and r.json()["detail"]["code"] == "INPUT_TOO_LONG"
    with pytest.raises(PayloadTooLargeError):
        SIEClient(server.url).encode(MINILM, "b" * 5000)
    assert SIEClient(server.url).encode(MINILM, "small")["dense"].shape == (384,)


def test_connection_failure_has_its_own_error() -> None:
    with pytest.raises(SIEConnectionError):
        SIEClient("http://127.0.0.1:9", timeout=2).encode(MINILM, "x")
