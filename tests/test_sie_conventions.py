"""SIE's model conventions on a real server process: profiles (catalog file, `options.profile`,
`model:profile`, `/v1/models` as SIE lists them, SIE's errors), `timing` (JSON, msgpack and
headers), and the refusal of SIE routes this server does not serve. The public `sie-sdk`'s
view of the same is in tests/test_sie_public.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import LEGAL_LORA, ROOT
from sie_sdk import Item, SIEClient
from sie_server.engine.catalog import load_catalog
from sie_server.engine.profiles import parse_profiles

M3 = "test/m3"
CAPTURES = Path("/work/shared/sie-captures")
DOCS = ["BGE-M3 gives dense, sparse and multivector outputs.", "Les chats dorment beaucoup.",
        "hello world"]
PROFILES = {
    "default": {"pooling": "cls", "normalize": True},
    "sparse": {"extends": "default", "output_types": ["sparse"]},
    "legal": {"extends": "default", "lora_id": LEGAL_LORA, "instruction": "Find the clause"},
    "queries": {"is_query": True, "normalize": False, "output_types": ["dense", "multivector"]},
    "fde": {"extends": "default", "muvera": {}, "output_types": ["dense"]},  # SIE's muvera profiles
}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, bge_m3_dir) -> Path:
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": {M3: {
        "family": "bge-m3", "source": str(bge_m3_dir), "instruction_template": "{instruction} {text}",
        "profiles": PROFILES}}}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def server(start_module_server, catalog, legal_lora):
    return start_module_server(["--catalog", str(catalog), "--adapter-root", str(legal_lora["root"]),
                         "--default-model", M3])


def encode(server, model: str, body: dict, msgpack_out: bool = False) -> httpx.Response:
    headers = {"Accept": "application/msgpack"} if msgpack_out else {}
    return httpx.post(f"{server.url}/v1/encode/{model}", json=body, headers=headers, timeout=120)


def items(texts=DOCS) -> list[dict]:
    return [{"text": t} for t in texts]


def test_catalog_profiles_resolve_and_refuse_by_name(tmp_path, catalog) -> None:
    specs, _ = load_catalog([catalog])
    got = specs[M3].profiles
    assert list(got) == ["default", "sparse", "legal", "queries", "fde"]
    assert got["fde"] == {"muvera": {}, "output_types": ["dense"]}
    assert got["sparse"] == {"output_types": ["sparse"]}  # SIE: the child's runtime replaces
    assert got["legal"]["lora_id"] == LEGAL_LORA
    assert parse_profiles("x", {"a": {"is_query": True}, "b": {"extends": "a"}})["b"] == {
        "is_query": True}  # no runtime of its own: the parent's
    assert parse_profiles("x", {"a": {"muvera": None, "lora_id": None}})["a"] == {}  # SIE's "off"
    templates = {"query_template": "q: {text}", "doc_template": "{instruction} {text}"}
    assert parse_profiles("x", {"a": templates})["a"] == templates
    sie_runtime = {"pooling": "splade", "max_seq_length": 128, "query_max_length": 32,
                   "default_instruction": "Given a web search query"}  # as SIE's YAMLs set them
    assert parse_profiles("x", {"a": sie_runtime})["a"] == sie_runtime
    builtin, _ = load_catalog([])
    assert list(builtin["BAAI/bge-m3"].profiles) == [  # SIE's models/BAAI__bge-m3.yaml
        "default", "dense", "sparse", "multivector", "candle", "banking", "medical-vn",
        "bge_m3_flag"]
    assert builtin["BAAI/bge-m3"].profiles["banking"] == {
        "pooling": "cls", "normalize": True, "lora_id": "saivamshiatukuri/bge-m3-banking77-lora",
        "instruction": "Classify banking intent"}
    assert builtin["sentence-transformers/all-MiniLM-L6-v2"].profiles == {"default": {}}
    for profiles, message in (({"a": {"extends": "b"}}, "extends unknown profile 'b'"),
                              ({"a": {"extends": "b"}, "b": {"extends": "c"}, "c": {}},
                               "profile chaining is not allowed"),
                              ({"a": {"pool": "cls"}}, "unknown key 'pool'"),
                              ({"a": {"is_query": "yes"}}, "is_query must be a bool"),
                              ({"a:b": {}}, "without ':'"),
                              ({"a": {"extends": ["b"]}}, "extends unknown profile"),
                              ({"a": {"muvera": 4}}, "muvera must be a dict"),
                              ({"a": {"doc_template": 3}}, "doc_template must be a str"),
                              ({"a": {"max_seq_length": "x"}}, "max_seq_length must be a int"),
                              ({"a": {"query_max_length": 0}}, "query_max_length must be a "
                                                               "positive number")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"models": {"x": {"family": "bge-m3", "source": "x",
                                                        "profiles": profiles}}}))
        with pytest.raises(ValueError, match=message):
            load_catalog([bad])


def test_profiles_by_option_and_by_suffix(server) -> None:
    base = encode(server, M3, {"items": items(), "params": {"output_types": ["sparse"]}}).json()
    by_suffix = encode(server, f"{M3}:sparse", {"items": items()}).json()
    by_option = encode(server, M3, {"items": items(), "params": {"options": {"profile": "sparse"}}}).json()
    for got in (by_suffix, by_option):
        assert [sorted(i) for i in got["items"]] == [["sparse", "token_count", "truncated"]] * 3
        assert [i["sparse"] for i in got["items"]] == [i["sparse"] for i in base["items"]]
    # SIE's rule: the profile's output types replace the request's
    again = encode(server, f"{M3}:sparse", {"items": items(), "params": {"output_types": ["dense"]}}).json()
    assert again["items"] == by_suffix["items"]
    # a LoRA profile with its instruction = the same options sent by hand; the request's win
    legal = encode(server, f"{M3}:legal", {"items": items()}).json()
    by_hand = encode(server, M3, {"items": items(), "params": {
        "options": {"lora_id": LEGAL_LORA, "instruction": "Find the clause"}}}).json()
    plain = encode(server, M3, {"items": items()}).json()
    assert legal["items"] == by_hand["items"] != plain["items"]
    override = encode(server, f"{M3}:legal", {"items": items(), "params": {"instruction": "Other"}}).json()
    other = encode(server, M3, {"items": items(), "params": {
        "options": {"lora_id": LEGAL_LORA, "instruction": "Other"}}}).json()
    assert override["items"] == other["items"] != legal["items"]
    queries = encode(server, f"{M3}:queries", {"items": items()}).json()
    assert {"dense", "multivector"} <= set(queries["items"][0])
    raw = encode(server, M3, {"items": items(), "params": {"output_types": ["dense", "multivector"],
                 "options": {"is_query": True, "normalize": False}}}).json()
    assert queries["items"] == raw["items"]  # the profile's normalize: false, as the option
    assert abs(np.linalg.norm(raw["items"][0]["dense"]["values"]) - 1) > 0.01
    # score: the profile's LoRA and instruction apply there too
    body = {"query": {"text": "what sleeps?"}, "items": items()}
    s_profile = httpx.post(f"{server.url}/v1/score/{M3}:legal", json=body).json()
    s_hand = httpx.post(f"{server.url}/v1/score/{M3}", json={
        **body, "options": {"lora_id": LEGAL_LORA, "instruction": "Find the clause"}}).json()
    assert s_profile["scores"] == s_hand["scores"]
    # OpenAI's model field takes the suffix too
    oa = httpx.post(f"{server.url}/v1/embeddings", json={"model": f"{M3}:legal", "input": DOCS}).json()
    np.testing.assert_allclose([d["embedding"] for d in oa["data"]],
                               [i["dense"]["values"] for i in by_hand["items"]], atol=1e-6)


def test_unknown_profiles_get_sies_errors(server) -> None:
    r = encode(server, M3, {"items": items(), "params": {"options": {"profile": "nope"}}})
    assert r.status_code == 400 and r.json() == {"detail": {
        "code": "INVALID_INPUT", "request_id": r.json()["detail"]["request_id"],
        "message": "Profile 'nope' not found. Available: ['default', 'sparse', 'legal', 'queries', 'fde']"}}
    r = encode(server, f"{M3}:nope", {"items": items()})
    assert r.status_code == 404 and r.json()["detail"]["code"] == "MODEL_NOT_FOUND"
    assert r.json()["detail"]["message"] == f"Model '{M3}:nope' not found"
    r = httpx.post(f"{server.url}/v1/score/{M3}", json={"query": {"text": "q"}, "items": items(),
                                                       "options": {"profile": ""}})
    assert r.status_code == 400
    assert r.json()["detail"]["message"] == "'options.profile' must be a non-empty string or null"
    assert httpx.get(f"{server.url}/v1/models/{M3}:nope").status_code == 404
    # a profile's muvera is options.muvera (the model's settings): dense is the encoding
    fde = encode(server, f"{M3}:fde", {"items": items()}).json()
    by_hand = encode(server, M3, {"items": items(), "params": {"options": {"muvera": {}}}}).json()
    assert fde["items"] == by_hand["items"] and len(fde["items"][0]["dense"]["values"]) == 10240


def test_models_list_profiles_as_sie_does(server) -> None:
    listed = httpx.get(f"{server.url}/v1/models").json()["models"]
    names = [m["name"] for m in listed]
    assert [n for n in names if n.startswith(M3)] == [M3, f"{M3}:sparse", f"{M3}:legal", f"{M3}:queries",
                                                      f"{M3}:fde"]
    base = next(m for m in listed if m["name"] == M3)
    assert {k: v["is_default"] for k, v in base["profiles"].items()} == {
        "default": True, "sparse": False, "legal": False, "queries": False, "fde": False}
    one = httpx.get(f"{server.url}/v1/models/{M3}:legal").json()
    assert one["name"] == f"{M3}:legal" and list(one["profiles"]) == ["default"]
    assert one["runtime"]["lora_id"] == LEGAL_LORA
    capture = CAPTURES / "raw_GET_v1_models.json"
    if capture.exists():  # SIE's own listing: the same keys, for the model and its profiles
        sie = json.loads(capture.read_text())["resp_body"]["models"]
        sie_m3 = next(m for m in sie if m["name"] == "BAAI/bge-m3")
        sie_variant = next(m for m in sie if m["name"] == "BAAI/bge-m3:sparse")
        assert set(sie_m3) <= set(base) and set(sie_variant) <= set(one)
        assert set(sie_m3["profiles"]["dense"]) == set(base["profiles"]["sparse"])


@pytest.mark.parametrize("binary", [False, True])
def test_timing_is_measured_and_consistent(server, binary) -> None:
    headers = {"Accept": "application/msgpack"} if binary else {}
    load = (lambda r: msgpack.unpackb(r.content, raw=False)) if binary else (lambda r: r.json())
    responses = [encode(server, M3, {"items": items(DOCS * 20), "params": {
                     "output_types": ["dense", "sparse", "multivector"]}}, binary),
                 httpx.post(f"{server.url}/v1/score/{M3}", headers=headers, json={
                     "query": {"text": "q"}, "items": items(), "options": {"score_mode": "hybrid"}})]
    for r in responses:
        assert r.status_code == 200, r.text
        t = load(r)["timing"]
        assert set(t) == {"total_ms", "queue_ms", "tokenization_ms", "inference_ms",
                          "postprocessing_ms"}
        assert all(isinstance(v, float) and v >= 0 for v in t.values()), t
        parts = t["queue_ms"] + t["tokenization_ms"] + t["inference_ms"] + t["postprocessing_ms"]
        assert parts <= t["total_ms"] + 1e-3, t
        assert t["inference_ms"] > 0 and t["tokenization_ms"] > 0
        assert float(r.headers["x-inference-time"]) == pytest.approx(t["inference_ms"], abs=0.01)
        assert float(r.headers["x-total-time"]) == pytest.approx(t["total_ms"], abs=0.01)
    with SIEClient(server.url) as client:  # ours carries it on through the SDK
        assert client.score(M3, Item(text="q"), [Item(text="a")])["timing"]["total_ms"] > 0
        assert client.encode(M3, [Item(text="a")])[0]["timing"]["inference_ms"] > 0


@pytest.mark.parametrize("method, path, feature", [
    ("POST", "/v1/generate/some/model", "text generation"),
    ("POST", "/v1/chat/completions", "chat completions"),
    ("POST", "/v1/completions", "text completions"),
    ("POST", "/v1/responses", "Responses API"),
    ("POST", "/v1/audio/transcriptions", "audio"),
    ("GET", "/v1/audio/voices", "audio"),
])
def test_unserved_sie_routes_are_refused_by_name(server, method, path, feature) -> None:
    r = httpx.request(method, f"{server.url}{path}", json={"model": M3})
    assert r.status_code == 501 and r.headers["x-sie-error-code"] == "NOT_IMPLEMENTED"
    detail = r.json()["detail"]
    assert detail["code"] == "NOT_IMPLEMENTED" and feature in detail["message"], detail
    assert "is not served by this server" in detail["message"]


def test_corpus_command_takes_a_profile(server, catalog, legal_lora, tmp_path) -> None:
    """`sie-server encode --model NAME:PROFILE`: the profile's output types and LoRA; the
    manifest records the profile in the model's name."""
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(DOCS)))
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "sie_server.cli", "encode", str(src), "--catalog", str(catalog),
           "--adapter-root", str(legal_lora["root"]), "--device", "cpu", "--dtype", "float32",
           "--id-field", "id"]
    done = subprocess.run(cmd + ["--model", f"{M3}:sparse", "--output", str(tmp_path / "s")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(next((tmp_path / "s").rglob("*.parquet"))).sort_by("id")
    assert {"sparse_indices", "sparse_values"} <= set(table.column_names)
    assert "dense" not in table.column_names, table.column_names
    want = encode(server, M3, {"items": items(), "params": {"output_types": ["sparse"]}}).json()
    for i, item in enumerate(want["items"]):
        assert table["sparse_indices"][i].as_py() == item["sparse"]["indices"]
        np.testing.assert_allclose(table["sparse_values"][i].as_py(), item["sparse"]["values"], atol=1e-6)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["config"]["model"]["name"] == f"{M3}:sparse"
    refused = subprocess.run(cmd + ["--model", f"{M3}:sparse", "--output-types", "dense",
                                    "--output", str(tmp_path / "d")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "disagrees" in refused.stderr
