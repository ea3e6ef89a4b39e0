"""Hybrid search on Qdrant with BGE-M3's three outputs, encoded by `sie-server encode`.

1. Encode the corpus (dense + sparse + multivector, float32):
       sie-server encode docs.jsonl --model BAAI/bge-m3 --id-field id \\
           --output-types dense,sparse,multivector --output encoded/
2. Index the shards and query:
       python examples/hybrid_search.py --encoded encoded/ --model BAAI/bge-m3 \\
           --query "what is a vector database?"
   Qdrant runs embedded in this process (`--qdrant-path`, local mode); pass
   `--qdrant-url http://localhost:6333` for a Qdrant server: the rest of the code is the same.
   Queries are encoded in this process, or by a running server with `--server URL`.

The query: dense and sparse candidates (`prefetch`), fused by Reciprocal Rank Fusion, then
reranked by ColBERT MaxSim on the multivectors. A model with fewer outputs (e.g. a dense-only
model) uses the ones it has.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
from qdrant_client import QdrantClient, models

DENSE, SPARSE, COLBERT = "dense", "sparse", "colbert"  # Qdrant vector names


def create_collection(client: QdrantClient, name: str, dims: dict[str, int],
                      output_types: Sequence[str]) -> None:
    """Named vectors for the outputs present: dense (cosine), sparse (dot product), and a
    ColBERT multivector compared with MAX_SIM (rerank only: no HNSW graph, m=0)."""
    vectors: dict[str, models.VectorParams] = {}
    if "dense" in output_types:
        vectors[DENSE] = models.VectorParams(size=dims["dense"], distance=models.Distance.COSINE)
    if "multivector" in output_types:
        vectors[COLBERT] = models.VectorParams(
            size=dims["multivector"], distance=models.Distance.COSINE,
            multivector_config=models.MultiVectorConfig(
                comparator=models.MultiVectorComparator.MAX_SIM),
            hnsw_config=models.HnswConfigDiff(m=0))
    sparse = {SPARSE: models.SparseVectorParams()} if "sparse" in output_types else None
    client.create_collection(name, vectors_config=vectors, sparse_vectors_config=sparse)


def read_encoded(folder: Path, batch_rows: int = 256) -> Iterator[list[dict[str, Any]]]:
    """Rows of an `sie-server encode` output folder (float32), in batches."""
    for shard in sorted(Path(folder).glob("part-*.parquet")):
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_rows):
            yield batch.to_pylist()


def index(client: QdrantClient, name: str, folder: Path) -> int:
    """Upsert every encoded row; point ids count rows in order, the row's id is payload."""
    manifest = _manifest(folder)
    types = manifest["config"]["output_types"]
    if manifest["config"]["output_dtype"] != "float32":
        raise ValueError("this example indexes float32 output (encode with --output-dtype float32)")
    if not client.collection_exists(name):
        create_collection(client, name, manifest["dims"], types)
    n = 0
    for rows in read_encoded(folder):
        points = []
        for row in rows:
            vector: dict[str, Any] = {}
            if "dense" in types:
                vector[DENSE] = row["dense"]
            if "sparse" in types:
                vector[SPARSE] = models.SparseVector(indices=row["sparse_indices"],
                                                     values=row["sparse_values"])
            if "multivector" in types:
                vector[COLBERT] = row["multivector"]
            points.append(models.PointStruct(id=n, vector=vector, payload={"doc_id": row["id"]}))
            n += 1
        client.upsert(name, points)
    return n


def _manifest(folder: Path) -> dict[str, Any]:
    import json

    return json.loads((Path(folder) / "manifest.json").read_text())


def fused_prefetch(dense: np.ndarray | None = None,
                   sparse: tuple[Sequence[int], Sequence[float]] | None = None,
                   candidates: int = 50, rrf_k: int = 60) -> models.Prefetch | None:
    """Dense and sparse candidate lists fused by RRF, as a prefetch stage (None: no query
    vector at all)."""
    stages = []
    if dense is not None:
        stages.append(models.Prefetch(query=np.asarray(dense).tolist(), using=DENSE,
                                      limit=candidates))
    if sparse is not None:
        stages.append(models.Prefetch(
            query=models.SparseVector(indices=list(map(int, sparse[0])),
                                      values=list(map(float, sparse[1]))),
            using=SPARSE, limit=candidates))
    if not stages:
        return None
    return models.Prefetch(prefetch=stages, query=models.RrfQuery(rrf=models.Rrf(k=rrf_k)),
                           limit=candidates)


def fuse(client: QdrantClient, name: str, limit: int = 10, **query: Any) -> list[models.ScoredPoint]:
    """The RRF stage alone (no rerank): `fused_prefetch`'s candidates, best first."""
    stage = fused_prefetch(**query)
    return client.query_points(name, prefetch=stage.prefetch, query=stage.query,
                               limit=limit).points


def search(client: QdrantClient, name: str, dense: np.ndarray | None = None,
           sparse: tuple[Sequence[int], Sequence[float]] | None = None,
           multivector: np.ndarray | None = None, limit: int = 10, candidates: int = 50,
           rrf_k: int = 60) -> list[models.ScoredPoint]:
    """Hybrid search: RRF of dense and sparse candidates, reranked by ColBERT MaxSim when a
    query multivector is given."""
    stage = fused_prefetch(dense, sparse, candidates, rrf_k)
    if multivector is None:
        return client.query_points(name, prefetch=stage.prefetch, query=stage.query,
                                   limit=limit).points
    return client.query_points(name, prefetch=stage, query=np.asarray(multivector).tolist(),
                               using=COLBERT, limit=limit).points


def query_vectors(result: Any) -> dict[str, Any]:
    """`search` keyword arguments from an encode result: the engine's ItemResult or the
    SDK's EncodeResult dict."""
    get = result.get if isinstance(result, dict) else lambda k: getattr(result, k, None)
    sparse = get("sparse")
    if isinstance(sparse, dict):
        sparse = (sparse["indices"], sparse["values"])
    return {"dense": get("dense"), "sparse": sparse, "multivector": get("multivector")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoded", type=Path, required=True, help="an sie-server encode output folder")
    p.add_argument("--model", required=True, metavar="NAME[=PATH]",
                   help="the model the corpus was encoded with")
    p.add_argument("--query", action="append", required=True, help="query text (repeatable)")
    p.add_argument("--collection", default="docs")
    p.add_argument("--qdrant-url", help="a Qdrant server (default: embedded, in --qdrant-path)")
    p.add_argument("--qdrant-path", type=Path, default=Path("qdrant-data"))
    p.add_argument("--server", help="encode queries with this sie-server (default: in process)")
    p.add_argument("--limit", type=int, default=5)
    args = p.parse_args(argv)

    client = (QdrantClient(url=args.qdrant_url) if args.qdrant_url
              else QdrantClient(path=str(args.qdrant_path)))
    if not client.collection_exists(args.collection):
        print(f"indexed {index(client, args.collection, args.encoded)} rows")
    types = _manifest(args.encoded)["config"]["output_types"]
    name, _, source = args.model.partition("=")
    if args.server:
        from sie_sdk import SIEClient

        with SIEClient(args.server) as sie:
            results = sie.encode(name, args.query, types, {"is_query": True})
    else:
        from sie_server.config import Settings
        from sie_server.engine import Engine

        engine = Engine(Settings(models={name: source} if source else {}, default_models=[]))
        try:
            results = engine.encode(name, args.query, types, {"is_query": True})
        finally:
            engine.close()
    for text, result in zip(args.query, results):
        print(f"\n{text}")
        for rank, hit in enumerate(search(client, args.collection, limit=args.limit,
                                          **query_vectors(result)), 1):
            print(f"  {rank}. {hit.payload['doc_id']}  score {hit.score:.4f}")
    client.close()


if __name__ == "__main__":
    main()
