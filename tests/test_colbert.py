"""ColBERT models (family colbert) against the reference libraries on the same weights.

Test models in the real layouts (scripts/make_colbert_test_models.py): Stanford colbert-ai
(BERT), PyLate on BERT (a biased Dense), on XLM-R (the real XLM-R tokenizer, "[Q] " / "[D] "
added) and on ModernBERT (GTE-ModernColBERT's layout). The references run in a subprocess (tests/colbert_reference.py) with the packages of
scripts/setup-colbert-ref.sh: colbert-ai's Checkpoint on the Stanford folder, PyLate's ColBERT
on every folder (it reads both layouts). A real server serves all of them; over HTTP:
- every query and document multivector equals the reference's within 1e-5 (markers, query
  expansion with unattended mask tokens, projection, punctuation skiplist, normalisation);
- /v1/score's MaxSim equals the reference's within 1e-5 (the query and the documents go
  through one packed batch);
- documents encoded together equal documents encoded one by one (1e-6);
- a LoRA adapter (peft, PyLate layout) equals PyLate on peft's merged model within 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import ROOT
from sie_sdk import SIEClient

sys.path.insert(0, str(ROOT / "scripts"))
import make_colbert_test_models  # noqa: E402

pytestmark = pytest.mark.slow
TOL = 1e-5
KINDS = make_colbert_test_models.KINDS  # stanford, pylate, modernbert
LORA = "org/colbert-lora"
SHORT = {"query_length": 10, "document_length": 14}  # below the test models' 24 / 96
QUERIES = ["what is late interaction?", "Who wrote ColBERT, and when? [MASK]",
           "a query long enough to be cut at the query length of the test models, which is "
           "twenty four tokens for BERT and XLM-R and sixteen for ModernBERT",
           "<s> a query typing </s> and <mask> too"]
DOCUMENTS = ["ColBERT encodes every token; MaxSim compares them.", "A short one.",
             "Punctuation!!! should... be: dropped; (mostly) -- but not words.",
             "Late interaction keeps one vector per token, " * 12 + "and the end is cut."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colbert")
    return {k: make_colbert_test_models.build(root / k, k, seed=i) for i, k in enumerate(KINDS)}


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, folders) -> dict:
    """A peft adapter of the PyLate test model under an adapter root, and a copy of that model
    folder holding peft's merged weights (what PyLate reads as the reference)."""
    from lora_adapters import make_adapter

    root = tmp_path_factory.mktemp("colbert-adapters")
    made = make_adapter(folders["pylate"], root / LORA, r=4, seed=5,
                        targets=["query", "value", "intermediate.dense"])
    merged = tmp_path_factory.mktemp("colbert-merged") / "pylate"
    subprocess.run(["cp", "-r", str(folders["pylate"]), str(merged.parent)], check=True)
    made["merged"].save_pretrained(str(merged), safe_serialization=True)
    return {"root": root, "merged": merged}


def reference(library: str, folder_list: list[Path], tmp: Path, name: str | None = None,
              **lengths) -> list[dict]:
    """The library's outputs per folder: {"q": [...], "d": [...], "scores": (nq, nd)};
    `lengths`: PyLate's query_length / document_length."""
    name = name or library
    target = subprocess.run([str(ROOT / "scripts" / "setup-colbert-ref.sh")], capture_output=True,
                            text=True, timeout=900)
    assert target.returncode == 0, target.stderr[-3000:]
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"folders": [str(f) for f in folder_list], "queries": QUERIES,
                                "documents": DOCUMENTS, "lengths": lengths}))
    env = {**os.environ, "PYTHONPATH": target.stdout.strip().splitlines()[-1],
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "colbert_reference.py"), library,
                           str(spec), str(tmp / f"{name}.npz")], capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(tmp / f"{name}.npz") as z:
        return [{"q": [z[f"{j}/q{i}"] for i in range(len(QUERIES))],
                 "d": [z[f"{j}/d{i}"] for i in range(len(DOCUMENTS))],
                 "scores": z[f"{j}/scores"]} for j in range(len(folder_list))]


@pytest.fixture(scope="module")
def references(folders, lora, tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("colbert-ref")
    pylate = reference("pylate", [*(folders[k] for k in KINDS), lora["merged"]], tmp)
    colbert_ai = reference("colbert-ai", [folders["stanford"]], tmp)
    out = {f"pylate/{k}": r for k, r in zip(KINDS, pylate)}
    out["pylate/lora"] = pylate[-1]
    out["colbert-ai/stanford"] = colbert_ai[0]
    out["pylate/short"] = reference("pylate", [folders["pylate"]], tmp, "pylate-short",
                                    **SHORT)[0]
    return out


@pytest.fixture(scope="module")
def server(start_module_server, folders, lora):
    args = []
    for k in KINDS:
        args += ["--model", f"colbert-{k}={folders[k]}"]
    return start_module_server([*args, "--adapter-root", str(lora["root"])])


def ours(url: str, model: str, lora_id: str | None = None, **options) -> dict:
    """Our multivectors and MaxSim scores over HTTP (queries and documents as the reference)."""
    options = ({"lora_id": lora_id} if lora_id else {}) | options or None
    with SIEClient(url) as c:
        q = [r["multivector"] for r in c.encode(model, QUERIES, ["multivector"], options,
                                                 is_query=True)]
        d = [r["multivector"] for r in c.encode(model, DOCUMENTS, ["multivector"], options)]
        scores = []
        for query in QUERIES:
            res = c.score(model, query, DOCUMENTS, options)
            assert res["score_mode"] == "colbert"
            by_item = {e["item_id"]: e["score"] for e in res["scores"]}
            scores.append([by_item[f"item-{i}"] for i in range(len(DOCUMENTS))])
    return {"q": q, "d": d, "scores": np.array(scores, np.float32)}


def assert_equal(got: dict, want: dict) -> None:
    for side in ("q", "d"):
        for i, (a, b) in enumerate(zip(got[side], want[side])):
            assert a.shape == b.shape, (side, i, a.shape, b.shape)
            np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=f"{side}{i}")
    np.testing.assert_allclose(got["scores"], want["scores"], atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["colbert-ai/stanford", "pylate/stanford", "pylate/pylate",
                                  "pylate/xlmr", "pylate/modernbert"])
def test_multivectors_and_maxsim_match_the_reference(server, references, case):
    got = ours(server.url, f"colbert-{case.split('/')[1]}")
    want = references[case]
    assert_equal(got, want)
    # queries keep every position (expanded to the query length); documents drop punctuation
    length = {"modernbert": make_colbert_test_models.MODERNBERT_QUERY_LENGTH}.get(
        case.split("/")[1], make_colbert_test_models.QUERY_LENGTH)
    assert all(len(q) == length for q in got["q"])
    assert len(got["d"][2]) < len(got["d"][0]) + 8  # the punctuation of document 2 is gone


def test_lora_adapter_matches_pylate_on_the_merged_model(server, references):
    got = ours(server.url, "colbert-pylate", LORA)
    assert_equal(got, references["pylate/lora"])
    base = references["pylate/pylate"]
    assert np.abs(got["d"][0] - base["d"][0]).max() > 1e-2  # the adapter changes the vectors


def test_sie_length_options_match_pylate_at_those_lengths(server, references):
    """SIE's per-request query_max_length / max_seq_length (its ColBERT adapter: below the
    model's, queries expanded to exactly that length) = PyLate's query_length /
    document_length, in encode and in score (1e-5)."""
    got = ours(server.url, "colbert-pylate", query_max_length=SHORT["query_length"],
               max_seq_length=SHORT["document_length"])
    assert_equal(got, references["pylate/short"])
    assert all(len(q) == SHORT["query_length"] for q in got["q"])
    assert len(got["d"][3]) < len(references["pylate/pylate"]["d"][3])  # cut


@pytest.mark.parametrize("kind", KINDS)
def test_packed_batches_equal_single_texts(server, kind):
    model = f"colbert-{kind}"
    with SIEClient(server.url) as c:
        for is_query, texts in ((True, QUERIES), (False, DOCUMENTS)):
            together = c.encode(model, texts, ["multivector"], is_query=is_query)
            for text, r in zip(texts, together):
                alone = c.encode(model, text, ["multivector"], is_query=is_query)
                np.testing.assert_allclose(alone["multivector"], r["multivector"], atol=1e-6)


def test_model_info_and_refusals(server, folders):
    from sie_server.engine.catalog import detect_family

    assert {detect_family(str(folders[k])) for k in KINDS} == {"colbert"}
    with httpx.Client(base_url=server.url, timeout=60) as h:
        info = h.get("/v1/models/colbert-stanford").json()
        assert info["dims"]["multivector"] == make_colbert_test_models.DIM
        r = h.post("/v1/encode/colbert-pylate", json={"items": [{"text": "x"}],
                                                       "params": {"output_types": ["dense"]}})
        assert r.status_code == 400 and "output_types" in r.text, r.text
