"""The PUBLIC `sie-sdk` (PyPI 0.10.1) and its integrations against our server process.

They need Python 3.12 and install the import name `sie_sdk` as ours does, so they live in
their own environment (.venv-sie-public, made and cached by scripts/setup-sie-public.sh) and
run as subprocesses (tests/sie_public/driver.py). What they return is compared here:
- the public SDK's float32 vectors are bit-equal to ours from the same server (the wire is
  lossless), and ours equal the in-process engine within 1e-6;
- every `output_dtype` equals our own quantization (sie_server.quantize) of those vectors;
- scores and model info are SIE's layout with our values; the integrations' vectors are the
  public SDK's, and their vector-store searches find each document by its own text.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import httpx
import numpy as np
import pytest

from conftest import CLEAN_ENV, ROOT, ServerProcess, run_public as run
from sie_sdk import SIEClient
from sie_sdk.types import Item
from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.quantize import quantize_rows, quantize_sparse_values

pytestmark = pytest.mark.slow
M3 = "BAAI/bge-m3"
DTYPES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")


@pytest.fixture(scope="module")
def docs(sie_python: str) -> list[str]:
    out = subprocess.run([sie_python, "-c", "import driver; print(__import__('json').dumps(driver.DOCS))"],
                         cwd=ROOT / "tests" / "sie_public", capture_output=True, text=True, check=True,
                         env=CLEAN_ENV)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def ours(bge_m3_server, docs) -> dict:
    """Our SDK's float32 results from the same server, for the same requests."""
    with SIEClient(bge_m3_server.url) as c:
        return {"all": c.encode(M3, [Item(text=d) for d in docs], ["dense", "sparse", "multivector"]),
                "legal": c.encode(M3, [Item(text=d) for d in docs], options={"lora_id": "org/bge-m3-legal-lora"})}


def test_seed_snippet_with_the_public_sdk(sie_python, bge_m3_server, docs, ours, legal_lora, bge_m3_dir,
                                          tmp_path) -> None:
    arrays, info = run(sie_python, "snippet", bge_m3_server.url, tmp_path)
    engine = Engine(Settings(models={M3: str(bge_m3_dir)}, default_models=[], device="cpu", dtype="float32",
                             adapter_roots=[legal_lora["root"]]))
    try:
        local = engine.encode(M3, docs, ["dense", "sparse"])
        local_legal = engine.encode(M3, docs, ["dense"], {"lora_id": "org/bge-m3-legal-lora"})
    finally:
        engine.close()
    for i, (mine, lo, mine_legal, lo_legal) in enumerate(zip(ours["all"], local, ours["legal"], local_legal)):
        assert arrays[f"dense{i}"].dtype == np.float32
        np.testing.assert_array_equal(arrays[f"dense{i}"], mine["dense"])  # lossless wire
        np.testing.assert_array_equal(arrays[f"hybrid_dense{i}"], mine["dense"])
        np.testing.assert_array_equal(arrays[f"sparse_idx{i}"], mine["sparse"]["indices"])
        np.testing.assert_array_equal(arrays[f"sparse_val{i}"], mine["sparse"]["values"])
        np.testing.assert_array_equal(arrays[f"legal{i}"], mine_legal["dense"])
        np.testing.assert_allclose(mine["dense"], lo.dense, atol=1e-6)
        np.testing.assert_array_equal(mine["sparse"]["indices"], lo.sparse[0])
        np.testing.assert_allclose(mine_legal["dense"], lo_legal.dense, atol=1e-6)
        assert float(mine_legal["dense"] @ mine["dense"]) < 0.9999  # the adapter applied
    assert {"dense", "sparse"} <= set(info["keys"][0]) and "multivector" not in info["keys"][0]


def test_every_output_dtype_equals_our_quantization(sie_python, bge_m3_server, ours, tmp_path) -> None:
    arrays, _ = run(sie_python, "dtypes", bge_m3_server.url, tmp_path)
    for dtype in DTYPES:
        for i, mine in enumerate(ours["all"]):
            for key, want in ((f"{dtype}_dense{i}", quantize_rows(mine["dense"], dtype)),
                              (f"{dtype}_mv{i}", quantize_rows(mine["multivector"], dtype)),
                              (f"{dtype}_sparse_val{i}", quantize_sparse_values(mine["sparse"]["values"], dtype)),
                              (f"{dtype}_sparse_idx{i}", mine["sparse"]["indices"])):
                got = arrays[key]
                assert got.dtype == want.dtype and got.shape == want.shape, (key, got.dtype, got.shape)
                np.testing.assert_array_equal(got, want, err_msg=key)
    assert arrays["binary_dense0"].shape == (8,)  # 64 dims, bit-packed


def test_normalize_false_through_the_public_sdk(sie_python, bge_m3_server, docs, ours,
                                                 tmp_path) -> None:
    """SIE's `normalize: false` sent by the public SDK: BGE-M3's dense and ColBERT vectors
    before their L2 step (tests/test_equivalence.py checks them against FlagEmbedding), in
    the directions of the default's. Its `pooling` and `default_instruction` on MiniLM give
    what our SDK gets with `pooling` and `instruction` (test_equivalence.py checks those
    against sentence-transformers)."""
    arrays, _ = run(sie_python, "raw_vectors", bge_m3_server.url, tmp_path)
    with SIEClient(bge_m3_server.url) as c:
        mine = c.encode("sentence-transformers/all-MiniLM-L6-v2", [Item(text=d) for d in docs],
                        options={"pooling": "cls", "is_query": True,
                                 "instruction": "Represent the question"})
        plain = c.encode("sentence-transformers/all-MiniLM-L6-v2", [Item(text=d) for d in docs])
    for i, (m, p) in enumerate(zip(mine, plain)):
        np.testing.assert_allclose(arrays[f"pooled{i}"], m["dense"], atol=1e-6)
        assert np.abs(arrays[f"pooled{i}"] - p["dense"]).max() > 1e-2
    for i, mine in enumerate(ours["all"]):
        dense, mv = arrays[f"dense{i}"], arrays[f"mv{i}"]
        assert abs(float(np.linalg.norm(dense)) - 1) > 0.01
        np.testing.assert_allclose(dense / np.linalg.norm(dense), mine["dense"], atol=1e-5)
        np.testing.assert_allclose(mv / np.linalg.norm(mv, axis=1, keepdims=True),
                                   mine["multivector"], atol=1e-5)


def test_score_models_and_typed_errors(sie_python, bge_m3_server, docs, tmp_path) -> None:
    _, info = run(sie_python, "score_and_models", bge_m3_server.url, tmp_path)
    with SIEClient(bge_m3_server.url) as c:
        mine = c.score(M3, Item(text="what is BGE-M3?"), [Item(text=d) for d in docs])
    got = info["score"]
    assert [s["item_id"] for s in got["scores"]] == [s["item_id"] for s in mine["scores"]]
    assert {s["item_id"] for s in got["scores"]} == {f"item-{i}" for i in range(len(docs))}
    np.testing.assert_allclose([s["score"] for s in got["scores"]], [s["score"] for s in mine["scores"]], atol=1e-6)
    assert got["usage"]["input_tokens"] > 0
    assert info["score_ids"]["query_id"] == "Q"
    assert {s["item_id"] for s in info["score_ids"]["scores"]} == {f"d{i}" for i in range(len(docs))}
    model = info["model"]
    assert model["name"] == M3 and model["loaded"] is True and model["state"] == "loaded"
    assert model["dims"] == {"dense": 64, "sparse": 250002, "multivector": 64}
    assert model["outputs"] == ["dense", "sparse", "multivector", "score"] and model["inputs"] == ["text"]
    assert model["max_sequence_length"] == 8192 and model["last_error"] is None
    assert {m["name"] for m in info["models"]} >= {M3, "sentence-transformers/all-MiniLM-L6-v2"}
    assert info["too_long"] == "InputTooLongError"
    assert info["deadline"] == "RequestError"  # 408: answered at once, not retried as a 504 would be


def test_score_modes_profiles_and_timing_with_the_public_sdk(sie_python, bge_m3_server, bge_m3_dir,
                                                              docs, tmp_path) -> None:
    """Every score mode, and the default (dense), equal FlagEmbedding's compute_score parts
    on the same weights within 1e-5; hybrid is SIE's weighted sum of them. Profiles by
    suffix and by option; SIE's TimingInfo reaches the SDK's encode results."""
    import reference

    arrays, info = run(sie_python, "score_modes", bge_m3_server.url, tmp_path)
    pairs = [(docs[0] + " " + docs[1], d) for d in docs]  # driver.SCORE_QUERY
    ref = reference.flag_compute_score(bge_m3_dir, pairs, weights=(0.4, 0.2, 0.4))
    parts = {k: np.asarray(ref[k], np.float64) for k in ("dense", "sparse", "colbert")}
    want = {"default": parts["dense"], **parts,
            "hybrid": 0.4 * parts["dense"] + 0.2 * parts["sparse"] + 0.4 * parts["colbert"],
            "weighted": 1.0 * parts["dense"] + 0.5 * parts["sparse"]}
    np.testing.assert_allclose(want["hybrid"], ref["colbert+sparse+dense"], atol=1e-6)
    assert (parts["sparse"] > 0).any()  # the sparse part is really exercised
    for name, expected in want.items():
        np.testing.assert_allclose(arrays[f"score_{name}"], expected, atol=1e-5, rtol=0, err_msg=name)
    assert info["bad_mode"][0] == "RequestError" and "Invalid score_mode 'bm25'" in info["bad_mode"][1]
    assert info["profile_keys"] == [["sparse"]] * (2 * len(docs))
    for i in range(len(docs)):
        np.testing.assert_array_equal(arrays[f"suffix_sparse_val{i}"], arrays[f"option_sparse_val{i}"])
    for t in info["timing"]:
        assert set(t) >= {"total_ms", "queue_ms", "tokenization_ms", "inference_ms"}
        assert min(t.values()) >= 0
        assert t["queue_ms"] + t["tokenization_ms"] + t["inference_ms"] + t["postprocessing_ms"] \
            <= t["total_ms"] + 1e-3
    assert info["bad_profile"][0] == "RequestError" and "Profile 'nope' not found" in info["bad_profile"][1]


def test_a_model_still_loading_is_waited_for(sie_python, bge_m3_dir, minilm_dir, tmp_path) -> None:
    """The first request sees 503 MODEL_LOADING (the load outlasts --model-load-timeout); the
    public SDK retries after Retry-After and gets the vectors."""
    server = ServerProcess(["--model", f"{M3}={bge_m3_dir}", "--default-model", "sentence-transformers/all-MiniLM-L6-v2",
                            "--model-load-timeout", "0.01"])
    try:
        before = httpx.get(f"{server.url}/v1/models/{M3}").json()
        assert before["loaded"] is False and before["state"] == "available"
        assert before["dims"] == {"dense": 64, "sparse": 250002, "multivector": 64}  # known before loading
        started = time.monotonic()
        arrays, _ = run(sie_python, "loading", server.url, tmp_path)
        assert arrays["dense"].shape == (64,)
        metrics = httpx.get(f"{server.url}/metrics").text
        refused = re.search(r'sie_requests_total\{model="BAAI/bge-m3",route="encode",status="503"\} (\d+)', metrics)
        assert refused and int(refused.group(1)) >= 1, metrics[-2000:]
        assert time.monotonic() - started < 120
    finally:
        server.stop()


def test_langchain_and_llamaindex(sie_python, bge_m3_server, docs, ours, tmp_path) -> None:
    for check in ("langchain", "llamaindex"):
        arrays, info = run(sie_python, check, bge_m3_server.url, tmp_path)
        for i, mine in enumerate(ours["all"]):
            np.testing.assert_array_equal(arrays[f"doc{i}"], mine["dense"], err_msg=check)
        assert arrays["query"].shape == (64,)
        sparse = info["sparse"]
        pairs = (list(zip(*sparse)) if check == "llamaindex"
                 else [(s["indices"], s["values"]) for s in sparse])
        for (idx, val), mine in zip(pairs, ours["all"]):
            assert idx == mine["sparse"]["indices"].tolist()
            np.testing.assert_allclose(val, mine["sparse"]["values"], rtol=1e-6)
        assert info["reranked"][0] == docs[1]  # the query is docs[1] itself


def test_vector_stores_qdrant_and_lancedb(sie_python, bge_m3_server, docs, ours, tmp_path) -> None:
    _, info = run(sie_python, "qdrant", bge_m3_server.url, tmp_path)
    assert info["dense_top"] == info["sparse_top"] == list(range(len(docs)))
    arrays, info = run(sie_python, "lancedb", bge_m3_server.url, tmp_path)
    assert info["ndims"] == 64 and info["top"] == docs
    for i, mine in enumerate(ours["all"]):
        np.testing.assert_array_equal(arrays[f"doc{i}"], mine["dense"])
