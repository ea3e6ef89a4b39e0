"""MUVERA (options.muvera) against SIE's own implementation on the same multivectors.

SIE's `MuveraPostprocessor` (sie-server 0.10.1, core/postprocessor.py) runs in
.venv-sie-public (scripts/setup-sie-public.sh) through tests/sie_public/muvera_reference.py on
the multivectors our server returns; the encodings our server returns for the same texts with
`options.muvera` must equal SIE's (rtol 1e-5, atol 1e-6; the sums run in another order):
- BGE-M3 (the BGE-M3-shaped test model) with SIE's default settings (40 repetitions, 64
  partitions, count sketch to 10,240), and with settings given in the request;
- a ColBERT model (Stanford layout) with colbertv2.0's settings from SIE's YAML (AMS projection
  to 8, no final projection) set in a --catalog file, and with centring and normalisation;
- each as a query (partitions summed) and as a document (partitions averaged).
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import yaml

from conftest import CLEAN_ENV, ROOT
from sie_sdk import SIEClient

sys.path.insert(0, str(ROOT / "scripts"))
import make_colbert_test_models  # noqa: E402


pytestmark = pytest.mark.slow
M3, COLBERT = "BAAI/bge-m3", "colbert-test"
# colbert-ir/colbertv2.0's muvera_config in SIE's models/colbert-ir__colbertv2.0.yaml
COLBERTV2 = {"num_repetitions": 40, "num_simhash_projections": 6, "projection_dim": 8,
             "final_projection_dim": None}
OVERRIDES = {"num_repetitions": 8, "num_simhash_projections": 4, "final_projection_dim": 512,
             "seed": 3, "normalize": True, "center_tokens": True}
TEXTS = {True: ["what is late interaction?", "MUVERA: fixed-dimensional encodings"],
         False: ["ColBERT keeps one vector per token; MaxSim compares them.", "x",
                 "Multi-vector retrieval made as fast as single-vector search, " * 6]}


@pytest.fixture(scope="module")
def server(start_module_server, bge_m3_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("muvera")
    colbert = make_colbert_test_models.build(root / "colbert", "stanford", seed=11)
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": {
        COLBERT: {"family": "colbert", "source": str(colbert), "muvera": COLBERTV2}}}))
    return start_module_server(["--catalog", str(catalog), "--model", f"{M3}={bge_m3_dir}"])


def test_encodings_equal_sies(server, sie_python, tmp_path):
    vectors, cases, ours = {}, [], {}
    with SIEClient(server.url) as c:
        for model, settings in ((M3, {}), (COLBERT, COLBERTV2)):
            for is_query, texts in TEXTS.items():
                side = f"{model}/{'query' if is_query else 'document'}"
                plain = c.encode(model, texts, ["multivector"], is_query=is_query)
                keys = [f"{side}/{i}" for i in range(len(texts))]
                vectors.update((k, r["multivector"]) for k, r in zip(keys, plain))
                for name, request, config in (("catalog", {}, settings),
                                              ("request", OVERRIDES, {**settings, **OVERRIDES})):
                    got = c.encode(model, texts, ["dense", "multivector"],
                                   {"muvera": request}, is_query=is_query)
                    for r, p in zip(got, plain):  # the multivector is the same one
                        np.testing.assert_array_equal(r["multivector"], p["multivector"])
                    ours[f"{side}/{name}"] = np.stack([r["dense"] for r in got])
                    cases.append({"name": f"{side}/{name}", "config": config,
                                  "is_query": is_query, "items": keys})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    np.savez(tmp_path / "vectors.npz", **vectors)
    done = subprocess.run([sie_python, str(ROOT / "tests" / "sie_public" / "muvera_reference.py"),
                           str(tmp_path / "cases.json"), str(tmp_path / "vectors.npz"),
                           str(tmp_path / "sie.npz")], capture_output=True, text=True,
                          timeout=600, env=CLEAN_ENV)
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(tmp_path / "sie.npz") as sie:
        for name, got in ours.items():
            want = sie[name]
            assert got.shape == want.shape, name
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert ours[f"{M3}/query/catalog"].shape[1] == 10240  # SIE's default count sketch
    assert ours[f"{COLBERT}/query/catalog"].shape[1] == 40 * 64 * 8
    # queries sum their partitions, documents average them: the same text differs
    assert not np.allclose(ours[f"{M3}/query/catalog"][0], ours[f"{M3}/document/catalog"][0])


def test_muvera_alone_returns_only_the_encoding(server):
    with SIEClient(server.url) as c:
        r = c.encode(COLBERT, "a document", options={"muvera": {}})
    assert set(r) >= {"dense"} and "multivector" not in r
    assert r["dense"].shape == (40 * 64 * 8,)


@pytest.mark.parametrize("model, muvera, field", [
    ("sentence-transformers/all-MiniLM-L6-v2", {}, "params.options.muvera"),
    (M3, {"k_sim": 4}, "params.options.muvera.k_sim"),
    (M3, {"num_repetitions": 0}, "params.options.muvera.num_repetitions"),
    (M3, {"normalize": "yes"}, "params.options.muvera.normalize"),
    (M3, {"num_simhash_projections": 40}, "params.options.muvera.num_simhash_projections"),
    (M3, {"num_repetitions": 10**6}, "params.options.muvera"),
    (M3, {"final_projection_dim": None, "num_repetitions": 100}, "params.options.muvera"),
    (M3, [], "params.options.muvera"),
])
def test_bad_settings_are_refused_by_name(server, model, muvera, field):
    body = {"items": [{"text": "x"}], "params": {"options": {"muvera": muvera}}}
    r = httpx.post(f"{server.url}/v1/encode/{model}", json=body, timeout=60)
    assert r.status_code == 400 and field in r.text, r.text
