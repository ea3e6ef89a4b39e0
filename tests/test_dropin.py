"""Drop-in routes (TEI, Cohere/Jina/SIE rerank, infinity) driven by the real client packages
against one real server, and their answers compared with SIE's own /v1/encode and /v1/score
for the same inputs.

The clients live in their own environments (scripts/setup-client-envs.sh: huggingface-hub
2.4.0 clashes with langchain-huggingface's < 2, infinity-client pins httpx < 0.28) and run
as subprocesses (tests/dropin/*.py). Dify's TEI provider and OpenWebUI's external reranker
are replayed here as the exact requests their source sends. Tolerances: vectors 1e-5 (the
same engine, JSON floats), scores 1e-6.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from urllib.parse import urljoin

import httpx
import numpy as np
import pytest
import reference
from hypothesis import HealthCheck, Phase, given, reject, settings

from conftest import ROOT
from test_score import ce_bert_dir  # noqa: F401  (the random-weight cross-encoder fixture)

pytestmark = pytest.mark.slow
EMBED, RERANK, M3 = "sentence-transformers/all-MiniLM-L6-v2", "test/ce-bert", "BAAI/bge-m3"
TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten naps."]
QUERY = "Where is the cat?"
# the clients reach only 127.0.0.1; huggingface_hub's offline mode would stop it there too
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}


@pytest.fixture(scope="module")
def server(start_module_server, minilm_dir, ce_bert_dir, bge_m3_dir):  # noqa: F811
    return start_module_server(["--model", f"{EMBED}={minilm_dir}", "--model", f"{RERANK}={ce_bert_dir}",
                         "--model", f"{M3}={bge_m3_dir}", "--default-model", EMBED,
                         "--default-model", RERANK, "--default-model", M3,
                         "--infinity-prefix", "/infinity"])


def client_env(group: str) -> str:
    setup = subprocess.run([str(ROOT / "scripts" / "setup-client-envs.sh"), group],
                           capture_output=True, text=True, timeout=1500)
    assert setup.returncode == 0, setup.stderr[-3000:]
    return setup.stdout.strip().splitlines()[-1]


def drive(group: str, *args: str) -> dict:
    out = subprocess.run([client_env(group), str(ROOT / "tests" / "dropin" / f"{group}.py"),
                          *args], capture_output=True, text=True, timeout=600, env=CLEAN_ENV)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def encode(url: str, model: str, texts: list[str], **params) -> list:
    r = httpx.post(f"{url}/v1/encode/{model}", json={
        "items": [{"text": t} for t in texts], "params": params}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def dense(url: str, texts: list[str], model: str = EMBED) -> np.ndarray:
    return np.array([i["dense"]["values"] for i in encode(url, model, texts)], np.float32)


def scores(url: str, query: str, texts: list[str], model: str = RERANK, **options) -> dict:
    """/v1/score's score per item index."""
    r = httpx.post(f"{url}/v1/score/{model}", json={
        "query": {"text": query}, "items": [{"text": t} for t in texts],
        **({"options": options} if options else {})}, timeout=60)
    assert r.status_code == 200, r.text
    return {int(s["item_id"].split("-")[1]): s["score"] for s in r.json()["scores"]}


def sigmoid(x: dict) -> dict:
    return {k: 1 / (1 + np.exp(-v)) for k, v in x.items()}


def test_hub_cohere_llamaindex_clients(server):
    """huggingface_hub InferenceClient, llama-index TEI embeddings / TEI rerank / JinaRerank and
    cohere Client / ClientV2 against the server; every vector and score equals SIE's."""
    got = drive("hub", server.url, RERANK)
    ref = dense(server.url, TEXTS)
    np.testing.assert_allclose(got["hf_feature_extraction"], ref, atol=1e-5)
    np.testing.assert_allclose(np.ravel(got["hf_feature_extraction_one"]), ref[0], atol=1e-5)
    np.testing.assert_allclose(got["llama_tei_embed"], ref, atol=1e-5)
    q = dense(server.url, [QUERY])[0]
    np.testing.assert_allclose(got["hf_sentence_similarity"], ref @ q, atol=1e-5)
    info = got["hf_endpoint_info"]
    assert info["model_id"] == EMBED and list(info["model_type"]) == ["embedding"]
    assert got["hf_health"] is True

    raw = scores(server.url, QUERY, TEXTS, activation="none")
    default = scores(server.url, QUERY, TEXTS)  # the engine's own activation: /v1/rerank's
    tei = sigmoid(raw)  # TEI's raw_scores: false
    best = sorted(tei, key=tei.get, reverse=True)
    assert [int(i) for i, _ in got["llama_tei_rerank"]] == best
    for i, s in got["llama_tei_rerank"]:
        assert s == pytest.approx(tei[int(i)], abs=1e-6)
    order = sorted(default, key=default.get, reverse=True)
    assert [[i, pytest.approx(default[i], abs=1e-6), TEXTS[i]] for i in order[:2]] == \
        got["cohere_v1"]
    assert [[i, pytest.approx(default[i], abs=1e-6)] for i in order] == got["cohere_v2"]
    assert [int(i) for i, _ in got["llama_jina_rerank"]] == order[:2]
    status, body = got["cohere_v2_error"]
    assert status == 404 and "no/such-model" in body["message"]


def test_langchain_huggingface_embeddings(server):
    got = drive("langchain", server.url)
    ref = dense(server.url, TEXTS)
    np.testing.assert_allclose(got["documents"], ref, atol=1e-5)
    np.testing.assert_allclose(got["query"], ref[0], atol=1e-5)
    np.testing.assert_allclose(got["async"], ref, atol=1e-5)


def test_infinity_client(server):
    got = drive("infinity", server.url, RERANK)
    np.testing.assert_allclose(got["embeddings"], dense(server.url, TEXTS), atol=1e-5)
    tei = sigmoid(scores(server.url, QUERY, TEXTS, activation="none"))
    assert [r[0] for r in got["rerank"]] == sorted(tei, key=tei.get, reverse=True)
    for i, s, doc in got["rerank"]:
        assert s == pytest.approx(tei[i], abs=1e-6) and doc == TEXTS[i]
    assert {EMBED, RERANK, M3} <= set(got["models"])
    r = httpx.post(f"{server.url}/infinity/rerank", json={"query": QUERY, "documents": TEXTS,
                                                          "model": RERANK}, timeout=60)
    assert [x["index"] for x in r.json()["results"]] == [r[0] for r in got["rerank"]]


def test_dify_tei_provider_requests(server):
    """The requests of Dify's TEI provider (tei_helper.py): GET /info, POST /tokenize,
    POST /v1/embeddings without a model, POST /rerank with return_text."""
    u = server.url
    info = httpx.get(f"{u}/info").json()
    assert list(info["model_type"])[0] == "embedding" and info["max_input_length"] > 0
    toks = httpx.post(f"{u}/tokenize", json={"inputs": TEXTS}).json()
    assert len(toks) == 3 and toks[0][0]["special"] and toks[0][1]["text"] == "The"
    emb = httpx.post(f"{u}/v1/embeddings", json={"input": TEXTS}, timeout=60).json()
    np.testing.assert_allclose([d["embedding"] for d in emb["data"]], dense(u, TEXTS), atol=1e-5)
    ranks = httpx.post(f"{u}/rerank", json={"query": QUERY, "texts": TEXTS, "return_text": True},
                       timeout=60).json()
    tei = sigmoid(scores(u, QUERY, TEXTS, activation="none"))
    assert [(r["index"], r["text"]) for r in ranks] == \
        [(i, TEXTS[i]) for i in sorted(tei, key=tei.get, reverse=True)]


def test_openwebui_external_reranker_request(server):
    """OpenWebUI's ExternalReranker: POST /v1/rerank {model, query, documents, top_n} with a
    bearer token; it sorts results by index and reads relevance_score."""
    r = httpx.post(f"{server.url}/v1/rerank", json={
        "model": RERANK, "query": QUERY, "documents": TEXTS, "top_n": len(TEXTS)},
        headers={"Authorization": "Bearer unused"}, timeout=60)
    got = [x["relevance_score"] for x in sorted(r.json()["results"], key=lambda x: x["index"])]
    ref = scores(server.url, QUERY, TEXTS)
    assert got == pytest.approx([ref[i] for i in range(3)], abs=1e-6)
    # Cohere v1 / Jina document objects, and max_tokens_per_doc at / under the model's limit
    body = {"model": RERANK, "query": QUERY, "documents": [{"text": t, "id": i}
                                                          for i, t in enumerate(TEXTS)]}
    objects = httpx.post(f"{server.url}/v1/rerank", json={**body, "max_tokens_per_doc": 4096},
                         timeout=60).json()["results"]
    assert {x["index"]: x["relevance_score"] for x in objects} == pytest.approx(ref, abs=1e-6)
    r = httpx.post(f"{server.url}/v1/rerank", json={**body, "max_tokens_per_doc": 8})
    assert r.status_code == 400 and "max_tokens_per_doc" in r.json()["message"]


@pytest.mark.parametrize("options", [None, {"score_type": "sparse"}])
def test_v1_rerank_equals_v1_score(server, options):
    """SIE's /v1/rerank is /v1/score's path: same scores and order, for a cross-encoder and
    for BGE-M3 with and without options (whatever the engine's defaults are)."""
    for model in (RERANK, M3):
        if model == RERANK and options:
            continue
        body = {"model": model, "query": QUERY, "documents": TEXTS, "return_documents": True}
        if options:
            body["options"] = options
        r = httpx.post(f"{server.url}/v1/rerank", json=body, timeout=60).json()
        ref = scores(server.url, QUERY, TEXTS, model=model, **(options or {}))
        assert [x["index"] for x in r["results"]] == sorted(ref, key=ref.get, reverse=True)
        for x in r["results"]:
            assert x["relevance_score"] == pytest.approx(ref[x["index"]], abs=1e-6)
            assert x["document"] == {"text": TEXTS[x["index"]]}
        assert r["model"] == model and r["usage"]["input_tokens"] > 0


def test_tei_sparse_all_and_errors(server, minilm_dir):
    """/embed_sparse and /embed_all equal /v1/encode's sparse and multivector; /embed with
    `normalize: false` equals sentence-transformers without its Normalize module (1e-4
    relative); TEI's error statuses and bodies; never a 500."""
    u = server.url
    sp = httpx.post(f"{u}/embed_sparse", json={"inputs": TEXTS[:2], "model": M3}, timeout=60)
    ref = encode(u, M3, TEXTS[:2], output_types=["sparse", "multivector"])
    for got, item in zip(sp.json(), ref):
        assert [g["index"] for g in got] == item["sparse"]["indices"]
        np.testing.assert_allclose([g["value"] for g in got], item["sparse"]["values"], atol=1e-6)
    raw = httpx.post(f"{u}/embed", json={"inputs": TEXTS, "normalize": False}, timeout=60)
    unnormalised = reference.st_encode(minilm_dir, TEXTS, normalize=False)  # no Normalize
    np.testing.assert_allclose(raw.json(), unnormalised, rtol=1e-4, atol=1e-5)
    assert np.abs(np.linalg.norm(unnormalised, axis=1) - 1).min() > 0.01
    al = httpx.post(f"{u}/embed_all", json={"inputs": TEXTS[:2], "model": M3}, timeout=60)
    for got, item in zip(al.json(), ref):
        np.testing.assert_allclose(got, item["multivector"]["values"], atol=1e-6)
    cases = [("/embed", {"inputs": []}, 400, "Empty"),
             ("/embed", {"inputs": [1, 2]}, 422, "Validation"),
             ("/embed", {"inputs": "x", "truncation_direction": "Left"}, 422, "Validation"),
             ("/embed", {"inputs": "word " * 5000, "truncate": False}, 413, "Validation"),
             ("/embed_sparse", {"inputs": "x"}, 424, "Backend"),
             ("/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, 400, "Empty"),
             ("/rerank", {"query": "q", "texts": []}, 400, "Empty"),
             ("/decode", {"ids": [10 ** 9]}, 422, "Validation"),
             ("/embed", {"inputs": "x", "model": "no/such"}, 422, "Validation")]
    for path, body, status, kind in cases:
        r = httpx.post(u + path, json=body, timeout=60)
        assert (r.status_code, r.json()["error_type"]) == (status, kind), (path, r.text)
        assert r.json()["error"]
    r = httpx.post(f"{u}/v1/rerank", json={"query": "q", "documents": ["a"], "bogus": 1})
    assert r.status_code == 400 and "bogus" in r.json()["error"]["message"]
    decoded = httpx.post(f"{u}/decode", json={"ids": [[t["id"] for t in tok]
                         for tok in httpx.post(f"{u}/tokenize", json={"inputs": TEXTS}).json()]})
    assert [s.lower() for s in decoded.json()] == [t.lower() for t in TEXTS]


def test_tei_timing_headers(server):
    """TEI's timing headers (TEI's router/src/lib.rs, ResponseMetadata) on every route TEI
    times, /v1/embeddings and /embeddings included: whole milliseconds; total = compute >=
    tokenization + queue + inference (disjoint parts of it); the characters TEI counts and the
    tokens the engine computed on."""
    u = server.url
    pairs = [[QUERY, t] for t in TEXTS]
    chars = sum(map(len, TEXTS))
    cases = [("/embed", {"inputs": TEXTS}, chars),
             ("/embed_sparse", {"inputs": TEXTS, "model": M3}, chars),
             ("/embed_all", {"inputs": TEXTS, "model": M3}, chars),
             ("/similarity", {"inputs": {"source_sentence": QUERY, "sentences": TEXTS}},
              len(QUERY) + chars),
             ("/rerank", {"query": QUERY, "texts": TEXTS}, 3 * len(QUERY) + chars),
             ("/predict", {"inputs": pairs}, 3 * len(QUERY) + chars),
             ("/", {"inputs": TEXTS}, chars),
             ("/v1/embeddings", {"input": TEXTS}, chars),
             ("/embeddings", {"input": TEXTS}, chars)]
    tokens = sum(i["token_count"] for i in encode(u, EMBED, TEXTS))
    inference = 0
    for path, body, characters in cases:
        r = httpx.post(u + path, json=body, timeout=60)
        assert r.status_code == 200, (path, r.text)
        h = {k[2:]: v for k, v in r.headers.items() if k.startswith("x-compute-") or
             k in ("x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time")}
        assert h.keys() == {"compute-type", "compute-time", "compute-characters",
                            "compute-tokens", "total-time", "tokenization-time", "queue-time",
                            "inference-time"}, (path, h)
        ms = {k: int(v) for k, v in h.items() if k.endswith("-time")}  # whole numbers
        assert ms["total-time"] == ms["compute-time"] >= \
            ms["tokenization-time"] + ms["queue-time"] + ms["inference-time"], (path, ms)
        assert h["compute-type"] == "cpu" and int(h["compute-characters"]) == characters, path
        assert int(h["compute-tokens"]) > 0
        if path in ("/embed", "/", "/v1/embeddings", "/embeddings"):
            assert int(h["compute-tokens"]) == tokens, path
        inference += ms["inference-time"]
    assert inference > 0  # measured, not a constant 0
    assert "x-total-time" not in httpx.post(f"{u}/tokenize", json={"inputs": "a"}).headers


# ---------------------------------------------------------------- OpenAPI, fuzzed

def test_openapi_lists_every_route_and_docs_are_served_offline(server):
    """/openapi.json holds every route the app serves (the same operation table makes both);
    /docs and its assets come from this process (swagger-ui-bundle), licence included."""
    from starlette.routing import Route

    from sie_server.api.app import create_app
    from sie_server.config import Settings
    from sie_server.engine import Engine

    spec = httpx.get(f"{server.url}/openapi.json").json()
    app = create_app(Engine(Settings(device="cpu", default_models=[],
                                     infinity_prefix="/infinity")), load_defaults=False)
    served = {(m, r.path.replace(":path", "")) for r in app.routes if isinstance(r, Route)
              for m in r.methods - {"HEAD"}}
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    own = {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/{name}"),
           ("GET", "/"), ("GET", "/ui/{name}")}  # the document and the web page
    assert served - own == documented
    assert spec["paths"]["/v1/encode/{model}"]["post"]["requestBody"]["content"].keys() == \
        {"application/json", "application/msgpack"}
    page = httpx.get(f"{server.url}/docs")
    assert page.status_code == 200 and '"docs/swagger-ui-bundle.js"' in page.text
    bundle = httpx.get(f"{server.url}/docs/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    assert "Apache License" in httpx.get(f"{server.url}/docs/LICENSE").text
    assert "cdn" not in page.text.lower()
    # the links are relative to /docs, so the page works under a prefix (a Ray application's,
    # which names it in X-Forwarded-Prefix: the document's server)
    links = re.findall(r'(?:href|src)="([^"]+)"', page.text)
    assert len(links) == 4 and all(not link.startswith("/") for link in links)
    for link in links:
        assert httpx.get(urljoin(f"{server.url}/docs", link)).status_code == 200, link
    assert 'url: "openapi.json"' in httpx.get(f"{server.url}/docs/init.js").text
    assert "servers" not in spec
    prefixed = httpx.get(f"{server.url}/openapi.json", headers={"x-forwarded-prefix": "/small/"})
    assert prefixed.json()["servers"] == [{"url": "/small"}]
    assert httpx.get(f"{server.url}/docs/..%2Fsecret").status_code == 404
    # OpenAPI 3.0 has no null type: `X | None` is X marked nullable, an enum listing null
    nodes = list(_schema_nodes(spec))
    assert not [n for n in nodes if n.get("type") == "null" or
                any("nullable" in o for k in ("anyOf", "oneOf") for o in n.get(k, []))]
    assert not [n for n in nodes if n.get("nullable") and None not in n.get("enum", [None])]
    assert [n for n in nodes if n.get("nullable") and "enum" in n]  # such enums are there


def _schema_nodes(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _schema_nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _schema_nodes(value)


EXAMPLES = 20  # per operation and request content type: ~900 requests in all


def test_openapi_fuzzed(server):
    """schemathesis on every operation of /openapi.json and each of its request content types
    (JSON, msgpack), a fixed budget of generated cases (derandomized): no 5xx but the 501 of
    the SIE features not served, and every status, content type and body as the document
    declares them."""
    schemathesis = pytest.importorskip("schemathesis")
    import msgpack
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance,
                                                   response_schema_conformance,
                                                   status_code_conformance)

    @schemathesis.serializer("application/msgpack")
    def _msgpack(ctx, value):
        try:
            data = msgpack.packb(value, use_bin_type=True)
        except OverflowError:  # an integer msgpack cannot carry (over 64 bits): not sendable
            reject()
        return {"data": data, "headers": {"Content-Type": "application/msgpack"}}

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    seen = set()
    for result in schema.get_all_operations():
        op = result.ok()
        media = list(op.definition.raw.get("requestBody", {}).get("content", {})) or [None]
        # a SIE feature this server does not have answers 501 by design (declared): its
        # status is checked against the document, not as a server error
        op_checks = checks[1:] if set(op.definition.raw.get("responses", {})) == {"501"} else checks
        for media_type in media:
            seen.add((op.method.upper(), op.path, media_type))

            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(media_type=media_type))
            def fuzz(case):
                case.call_and_validate(checks=op_checks, timeout=60)

            fuzz()
    assert ("POST", "/v1/encode/{model}", "application/msgpack") in seen
    assert ("POST", "/v1/rerank", "application/json") in seen and len(seen) >= 30


def test_every_route_answers_errors_in_the_envelope_its_openapi_documents():
    """api/envelopes.py picks an error envelope by path for every route (and for the errors
    raised outside routes: API keys, the Ray gateway); the OpenAPI document names one per
    route. They agree on every route, the infinity prefix's included."""
    import threading

    from sie_server.api import envelopes, rerank, tei, validate
    from sie_server.api.app import operations
    from sie_server.api.calls import Calls
    from sie_server.api.openai import OpenAIError
    from sie_server.config import Settings
    from sie_server.engine import Engine

    kinds = {validate.SIEErrorResponse: envelopes.sie_error, OpenAIError: envelopes.openai_error,
             rerank.RerankError: envelopes.rerank_error, rerank.CohereError: envelopes.rerank_error,
             tei.TEIError: envelopes.tei_error}
    engine = Engine(Settings(default_models=[], device="cpu", infinity_prefix="/infinity"))
    try:
        ops = operations(Calls(engine), threading.Event(), [])
    finally:
        engine.close()
    checked = 0
    for op in ops:
        documented = {kinds[t] for status, t in op.responses.items() if status >= 400 and t in kinds}
        got = envelopes.renderer(op.path, "/infinity")
        assert documented <= {got}, (op.method, op.path, documented, got)
        checked += bool(documented)
    assert checked >= 25
    # every envelope names the error's code in X-SIE-Error-Code (routes add none of their own)
    from starlette.requests import Request

    from sie_server.errors import Overloaded
    for path in ("/v1/encode/m", "/v1/embeddings", "/v1/rerank", "/v2/rerank", "/embed"):
        scope = {"type": "http", "method": "POST", "path": path, "headers": [],
                 "query_string": b""}
        r = envelopes.renderer(path)(Request(scope), Overloaded("full", retry_after=2))
        assert r.headers["x-sie-error-code"] == "QUEUE_FULL", path


def test_tei_error_statuses_for_engine_errors():
    """The engine's errors that a loopback test cannot provoke cheaply (a full queue, a model
    still loading, a dead worker) in TEI's statuses and kinds."""
    from sie_server.api.tei import error_response
    from sie_server.errors import (InputTooLong, InternalError, ModelLoading, Overloaded,
                                   ResourceExhausted)

    for err, status, kind in [(Overloaded("full", retry_after=2), 429, "Overloaded"),
                              (ResourceExhausted("oom"), 429, "Overloaded"),
                              (ModelLoading("loading"), 503, "Unhealthy"),
                              (InputTooLong("long"), 413, "Validation"),
                              (InternalError("bug"), 424, "Backend")]:
        r = error_response(None, err)
        assert (r.status_code, json.loads(r.body)["error_type"]) == (status, kind)
    assert error_response(None, Overloaded("full", retry_after=2)).headers["retry-after"] == "2"


def test_tei_root_needs_the_api_key(start_server, minilm_dir):
    """`GET /` (the web page) is open; `POST /` (TEI's embed) needs the key like every
    inference route. A refused key is answered in the route's own protocol's envelope, with
    WWW-Authenticate and X-SIE-Error-Code."""
    server = start_server(["--model", f"{EMBED}={minilm_dir}", "--default-model", EMBED,
                           "--api-key", "k1", "--infinity-prefix", "/infinity"])
    bodies = {"/": {"error_type": "Validation", "error": "missing or invalid API key"},
              "/v1/embeddings": {"error": {"message": "missing or invalid API key",
                                           "type": "invalid_request_error",
                                           "code": "UNAUTHORIZED", "param": None}},
              "/infinity/embeddings": {"error": {"message": "missing or invalid API key",
                                                 "type": "invalid_request_error",
                                                 "code": "UNAUTHORIZED", "param": None}},
              "/v2/rerank": {"message": "missing or invalid API key"}}
    for path, want in bodies.items():
        r = httpx.post(f"{server.url}{path}", json={"inputs": "x"})
        assert r.status_code == 401 and r.json() == want, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.headers["x-sie-error-code"] == "UNAUTHORIZED"
    r = httpx.post(f"{server.url}/v1/encode/{EMBED}", json={})
    assert r.status_code == 401 and r.json()["detail"]["code"] == "UNAUTHORIZED"
    assert r.json()["detail"]["request_id"] == r.headers["x-request-id"]
    # a wrong method keeps its 405 on every protocol's route (TEI's envelope maps its own
    # errors' statuses, not the router's)
    key = {"Authorization": "Bearer k1"}
    for path, field in (("/embed", "error_type"), ("/v1/embeddings", "error"),
                        ("/v2/rerank", "message"), ("/v1/models/x/y/adapters", "detail")):
        r = httpx.put(f"{server.url}{path}", json={}, headers=key)
        assert r.status_code == 405 and field in r.json(), (path, r.status_code, r.text)
    r = httpx.post(f"{server.url}/v1/embeddings/x", json={}, headers=key)
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
    r = httpx.post(f"{server.url}/", json={"inputs": "x"}, headers={"Authorization": "Bearer k1"},
                   timeout=60)
    assert r.status_code == 200 and len(r.json()[0]) == 384
    assert httpx.get(f"{server.url}/").status_code == 200
