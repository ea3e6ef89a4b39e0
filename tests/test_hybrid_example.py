"""examples/hybrid_search.py on embedded Qdrant (qdrant-client local mode), on a corpus
encoded by the corpus command: every document's own text retrieves it first; the RRF stage
equals a numpy RRF over the same dense and sparse candidate lists; the rerank equals a numpy
ColBERT MaxSim over the fused candidates. Run on the BGE-M3-shaped test model (all three
outputs) and on all-MiniLM-L6-v2 (dense only)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from sie_server.columns import from_columns
from sie_server.config import Settings
from sie_server.corpus.backends import InProcessBackend
from sie_server.corpus.readers import expand
from sie_server.corpus.run import Job, run
from sie_server.corpus.writer import read_output
from sie_server.engine import Engine
from texts import SHORT_TEXTS

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("hybrid_search", ROOT / "examples" / "hybrid_search.py")
hybrid = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hybrid)

M3, MINILM = "BAAI/bge-m3", "sentence-transformers/all-MiniLM-L6-v2"
DOCS = list(dict.fromkeys(t for t in SHORT_TEXTS if len(t.split()) >= 3))[:30]
RRF_K, CANDIDATES = 60, 12


@pytest.fixture(scope="module")
def engine(bge_m3_dir: Path, minilm_dir: Path):
    eng = Engine(Settings(dtype="float32", models={M3: str(bge_m3_dir), MINILM: str(minilm_dir)},
                          default_models=[], device="cpu"))
    yield eng
    eng.close()


def encoded(engine, model: str, types: list[str], folder: Path) -> Path:
    src = folder / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n"
                           for i, t in enumerate(DOCS)))
    out = folder / "encoded"
    run(Job(files=expand([str(src)]), output=out, output_types=types, id_field="id",
            shard_rows=8), InProcessBackend(engine, model, types, {}))
    return out


def numpy_rrf(lists: list[list[int]], k: int) -> dict[int, float]:
    """RRF as Qdrant defines it: sum over lists of 1 / (k + rank), rank counted from 0."""
    scores: dict[int, float] = {}
    for ids in lists:
        for rank, pid in enumerate(ids):
            scores[pid] = scores.get(pid, 0.0) + 1.0 / (k + rank)
    return scores


def assert_ranking(points, expected: dict[int, float], tol: float) -> None:
    """Qdrant's ranking equals sorting by `expected` (ties in any order)."""
    got = [(p.id, p.score) for p in points]
    for pid, score in got:
        assert score == pytest.approx(expected[pid], abs=tol), pid
    scores = [s for _, s in got]
    assert scores == sorted(scores, reverse=True)
    best = sorted(expected.values(), reverse=True)[:len(got)]
    np.testing.assert_allclose(scores, best, atol=tol)


@pytest.mark.parametrize("model,types", [(M3, ["dense", "sparse", "multivector"]),
                                         (MINILM, ["dense"])])
def test_hybrid_search(engine, tmp_path: Path, model: str, types: list[str]) -> None:
    out = encoded(engine, model, types, tmp_path)
    client = QdrantClient(path=str(tmp_path / "qdrant"))  # embedded local mode
    assert hybrid.index(client, "docs", out) == len(DOCS)
    stored = from_columns(read_output(out))
    queries = engine.encode(model, DOCS, types, {"is_query": True})

    for i, q in enumerate(queries):
        vectors = hybrid.query_vectors(q)
        hits = hybrid.search(client, "docs", limit=3, candidates=CANDIDATES, rrf_k=RRF_K,
                             **vectors)
        assert hits[0].payload["doc_id"] == f"doc-{i}", (i, [h.payload for h in hits])

        # the fusion stage == numpy RRF over the same candidate lists
        lists = [[p.id for p in client.query_points("docs", query=q.dense.tolist(),
                                                    using=hybrid.DENSE, limit=CANDIDATES).points]]
        if "sparse" in types:
            lists.append([p.id for p in client.query_points(
                "docs", query=hybrid.models.SparseVector(indices=q.sparse[0].tolist(),
                                                         values=q.sparse[1].tolist()),
                using=hybrid.SPARSE, limit=CANDIDATES).points])
        fused = hybrid.fuse(client, "docs", limit=CANDIDATES, candidates=CANDIDATES,
                            rrf_k=RRF_K, dense=vectors["dense"], sparse=vectors["sparse"])
        assert_ranking(fused, numpy_rrf(lists, RRF_K), 1e-9)

        # the rerank == numpy MaxSim (sum over query tokens of the best document token)
        if "multivector" in types:
            candidates = {p.id for p in hybrid.fuse(client, "docs", limit=CANDIDATES,
                                                    candidates=CANDIDATES, rrf_k=RRF_K,
                                                    dense=vectors["dense"],
                                                    sparse=vectors["sparse"])}
            maxsim = {pid: float((q.multivector @ stored[pid].multivector.T).max(axis=1).sum())
                      for pid in candidates}
            assert_ranking(hybrid.search(client, "docs", limit=5, candidates=CANDIDATES,
                                         rrf_k=RRF_K, **vectors), maxsim, 1e-4)
    client.close()


def test_main_end_to_end(engine, bge_m3_dir: Path, tmp_path: Path, capsys) -> None:
    out = encoded(engine, M3, ["dense", "sparse", "multivector"], tmp_path)
    hybrid.main(["--encoded", str(out), "--model", f"{M3}={bge_m3_dir}", "--query", DOCS[4],
                 "--qdrant-path", str(tmp_path / "q"), "--limit", "3"])
    printed = capsys.readouterr().out
    assert f"indexed {len(DOCS)} rows" in printed
    assert printed.split("\n  1. ")[1].startswith("doc-4 ")
