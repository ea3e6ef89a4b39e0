"""Runs under Python 3.12 with the PUBLIC `sie-sdk` and its integrations (.venv-sie-public),
against our server: `python driver.py CHECK URL OUT_DIR`. Each check calls the public packages
as their documentation shows and saves what they returned (OUT_DIR/CHECK.npz for arrays,
OUT_DIR/CHECK.json for the rest); tests/test_sie_public.py compares that with our engine.
Nothing here imports our code: `sie_sdk` in this environment is SIE's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sie_sdk import SIEClient
from sie_sdk.types import Item

M3 = "BAAI/bge-m3"
DOCS = ["BGE-M3 gives dense, sparse and multivector outputs.",
        "Les chats dorment beaucoup.", "猫は一日中寝ている。", "hello world"]
SCORE_QUERY = DOCS[0] + " " + DOCS[1]  # shares tokens with DOCS: the sparse score is not 0
DTYPES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")


def snippet(url: str, arrays: dict, info: dict) -> None:
    """The seed snippet of the product's documentation, verbatim but for `documents`."""
    documents = DOCS
    client = SIEClient(url)
    dense_results = client.encode("BAAI/bge-m3", [Item(text=d) for d in documents])
    hybrid_results = client.encode("BAAI/bge-m3", [Item(text=d) for d in documents],
                                   output_types=["dense", "sparse"])
    legal_results = client.encode("BAAI/bge-m3", [Item(text=d) for d in documents],
                                  options={"lora_id": "org/bge-m3-legal-lora"})
    for i, (d, h, g) in enumerate(zip(dense_results, hybrid_results, legal_results)):
        arrays[f"dense{i}"], arrays[f"hybrid_dense{i}"] = d["dense"], h["dense"]
        arrays[f"sparse_idx{i}"], arrays[f"sparse_val{i}"] = h["sparse"]["indices"], h["sparse"]["values"]
        arrays[f"legal{i}"] = g["dense"]
    info["keys"] = [sorted(r) for r in hybrid_results]


def dtypes(url: str, arrays: dict, info: dict) -> None:
    client = SIEClient(url)
    for dtype in DTYPES:
        results = client.encode(M3, [Item(text=d) for d in DOCS],
                                output_types=["dense", "sparse", "multivector"], output_dtype=dtype)
        for i, r in enumerate(results):
            arrays[f"{dtype}_dense{i}"] = r["dense"]
            arrays[f"{dtype}_mv{i}"] = r["multivector"]
            arrays[f"{dtype}_sparse_idx{i}"] = r["sparse"]["indices"]
            arrays[f"{dtype}_sparse_val{i}"] = r["sparse"]["values"]


def raw_vectors(url: str, arrays: dict, info: dict) -> None:
    """SIE's `normalize: false`, as the public SDK sends it; and its `pooling` and
    `default_instruction` on a sentence-transformers model."""
    client = SIEClient(url)
    results = client.encode(M3, [Item(text=d) for d in DOCS], output_types=["dense", "multivector"],
                            options={"normalize": False})
    for i, r in enumerate(results):
        arrays[f"dense{i}"], arrays[f"mv{i}"] = r["dense"], r["multivector"]
    pooled = client.encode("sentence-transformers/all-MiniLM-L6-v2", [Item(text=d) for d in DOCS],
                           options={"pooling": "cls", "is_query": True,
                                    "default_instruction": "Represent the question"})
    for i, r in enumerate(pooled):
        arrays[f"pooled{i}"] = r["dense"]


def score_and_models(url: str, arrays: dict, info: dict) -> None:
    from sie_sdk.client.errors import InputTooLongError

    client = SIEClient(url)
    info["score"] = client.score(M3, Item(text="what is BGE-M3?"), [Item(text=d) for d in DOCS])
    info["score_ids"] = client.score(M3, Item(text="q", id="Q"),
                                     [Item(text=d, id=f"d{i}") for i, d in enumerate(DOCS)])
    info["models"] = client.list_models()
    info["model"] = client.get_model(M3)
    try:
        client.encode(M3, Item(text="word " * 9000), options={"truncate": False})
        info["too_long"] = "no error"
    except InputTooLongError as err:
        info["too_long"] = type(err).__name__
    # a client-set deadline is answered once, not retried for minutes
    try:
        client.encode(M3, [Item(text="x " * 4000)] * 64, options={"timeout_s": 0.001})
        info["deadline"] = "no error"
    except Exception as err:  # noqa: BLE001 - the class is the result
        info["deadline"] = type(err).__name__


def score_modes(url: str, arrays: dict, info: dict) -> None:
    """SIE's BGE-M3 score options, as the public SDK sends them; profiles by suffix and by
    option; the TimingInfo the SDK hands back with encode results."""
    client = SIEClient(url)
    query, items = Item(text=SCORE_QUERY), [Item(text=d) for d in DOCS]
    runs = {"default": None, **{m: {"score_mode": m} for m in ("dense", "sparse", "colbert", "hybrid")},
            "weighted": {"score_mode": "hybrid", "score_weights": {"dense": 1.0, "sparse": 0.5, "colbert": 0}}}
    for name, options in runs.items():
        got = client.score(M3, query, items, options=options)
        by_id = {s["item_id"]: s["score"] for s in got["scores"]}
        arrays[f"score_{name}"] = np.asarray([by_id[f"item-{i}"] for i in range(len(DOCS))])
    try:
        client.score(M3, query, items, options={"score_mode": "bm25"})
        info["bad_mode"] = "no error"
    except Exception as err:  # noqa: BLE001 - the class and message are the result
        info["bad_mode"] = [type(err).__name__, str(err)]
    by_suffix = client.encode(f"{M3}:sparse", items)
    by_option = client.encode(M3, items, options={"profile": "sparse"})
    info["profile_keys"] = [sorted(k for k in r if k in ("dense", "sparse", "multivector"))
                            for r in by_suffix + by_option]
    for i, r in enumerate(by_suffix):
        arrays[f"suffix_sparse_val{i}"] = r["sparse"]["values"]
        arrays[f"option_sparse_val{i}"] = by_option[i]["sparse"]["values"]
    info["timing"] = [r.get("timing") for r in client.encode(M3, items)]
    try:
        client.encode(M3, items, options={"profile": "nope"})
        info["bad_profile"] = "no error"
    except Exception as err:  # noqa: BLE001
        info["bad_profile"] = [type(err).__name__, str(err)]


def loading(url: str, arrays: dict, info: dict) -> None:
    """A model that is still loading: the SDK waits (503 MODEL_LOADING) and succeeds."""
    arrays["dense"] = SIEClient(url).encode(M3, Item(text=DOCS[0]))["dense"]


def langchain(url: str, arrays: dict, info: dict) -> None:
    from langchain_core.documents import Document
    from sie_langchain import SIEEmbeddings, SIEReranker, SIESparseEncoder

    emb = SIEEmbeddings(base_url=url, model=M3)
    for i, v in enumerate(emb.embed_documents(DOCS)):
        arrays[f"doc{i}"] = np.asarray(v, dtype=np.float32)
    arrays["query"] = np.asarray(emb.embed_query(DOCS[0]), dtype=np.float32)
    sparse = SIESparseEncoder(base_url=url, model=M3).encode_documents(DOCS)
    info["sparse"] = sparse
    ranked = SIEReranker(base_url=url, model=M3, top_k=2).compress_documents(
        [Document(page_content=d) for d in DOCS], DOCS[1])
    info["reranked"] = [d.page_content for d in ranked]


def llamaindex(url: str, arrays: dict, info: dict) -> None:
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from sie_llamaindex import SIEEmbedding, SIENodePostprocessor, SIESparseEmbeddingFunction

    emb = SIEEmbedding(base_url=url, model_name=M3)
    for i, v in enumerate(emb.get_text_embedding_batch(DOCS)):
        arrays[f"doc{i}"] = np.asarray(v, dtype=np.float32)
    arrays["query"] = np.asarray(emb.get_query_embedding(DOCS[0]), dtype=np.float32)
    info["sparse"] = SIESparseEmbeddingFunction(base_url=url, model_name=M3).encode_documents(DOCS)
    nodes = [NodeWithScore(node=TextNode(text=d)) for d in DOCS]
    ranked = SIENodePostprocessor(base_url=url, model=M3, top_n=2).postprocess_nodes(
        nodes, QueryBundle(DOCS[1]))
    info["reranked"] = [n.node.get_content() for n in ranked]


def qdrant(url: str, arrays: dict, info: dict) -> None:
    """sie-qdrant's documented flow, on Qdrant's embedded local mode: each document's own text
    must find it first, by dense and by sparse vectors."""
    from qdrant_client import QdrantClient
    from qdrant_client.models import (Distance, PointStruct, SparseVector, SparseVectorParams,
                                      VectorParams)
    from sie_qdrant import SIENamedVectorizer, SIEVectorizer

    vectorizer = SIEVectorizer(base_url=url, model=M3)
    dims = len(vectorizer.embed_query("x"))
    db = QdrantClient(":memory:")
    db.create_collection("dense", vectors_config=VectorParams(size=dims, distance=Distance.COSINE))
    db.upsert("dense", points=[PointStruct(id=i, vector=v, payload={"text": t})
                               for i, (t, v) in enumerate(zip(DOCS, vectorizer.embed_documents(DOCS)))])
    info["dense_top"] = [db.query_points("dense", query=vectorizer.embed_query(t), limit=1).points[0].id
                         for t in DOCS]
    named = SIENamedVectorizer(base_url=url, model=M3, output_types=["dense", "sparse"])
    db.create_collection("hybrid", vectors_config={"dense": VectorParams(size=dims, distance=Distance.COSINE)},
                         sparse_vectors_config={"sparse": SparseVectorParams()})
    db.upsert("hybrid", points=[PointStruct(id=i, vector={"dense": n["dense"], "sparse": n["sparse"]})
                                for i, n in enumerate(named.embed_documents(DOCS))])
    tops = []
    for t in DOCS:
        q = named.embed_query(t)["sparse"]
        sv = q if isinstance(q, SparseVector) else SparseVector(**q)
        tops.append(db.query_points("hybrid", query=sv, using="sparse", limit=1).points[0].id)
    info["sparse_top"] = tops


def lancedb(url: str, arrays: dict, info: dict) -> None:
    """sie-lancedb's registered embedding function on a LanceDB table: the table embeds on
    insert and on search; each document's own text finds it first."""
    import tempfile

    import lancedb as ldb
    from lancedb.embeddings import get_registry
    from lancedb.pydantic import LanceModel, Vector

    import sie_lancedb  # noqa: F401 - registers "sie"

    sie = get_registry().get("sie").create(model=M3, base_url=url)

    class Documents(LanceModel):
        text: str = sie.SourceField()
        vector: Vector(sie.ndims()) = sie.VectorField()  # type: ignore[valid-type]

    db = ldb.connect(tempfile.mkdtemp())
    table = db.create_table("docs", schema=Documents)
    table.add([{"text": t} for t in DOCS])
    info["ndims"] = sie.ndims()
    info["top"] = [table.search(t).limit(1).to_list()[0]["text"] for t in DOCS]
    for i, row in enumerate(table.to_arrow().to_pylist()):
        arrays[f"doc{DOCS.index(row['text'])}"] = np.asarray(row["vector"], dtype=np.float32)


GLINER = "urchade/gliner_multi-v2.1"
EXTRACT_TEXTS = ["Apple Inc. was founded by Steve Jobs in Cupertino, California in 1976.",
                 "Angela Merkel traf Emmanuel Macron in Paris.", "東京は日本の首都です。"]
EXTRACT_LABELS = ["person", "organization", "location"]


def extract(url: str, arrays: dict, info: dict) -> None:
    """The public SDK's `extract` (sie-sdk's documented call), then the extractor components of
    the integrations installed here (sie-langchain, sie-llamaindex, sie-lancedb)."""
    from sie_sdk.client.errors import RequestError

    client = SIEClient(url)
    one = client.extract(GLINER, Item(text=EXTRACT_TEXTS[0]), labels=EXTRACT_LABELS,
                         options={"threshold": 0.4})
    many = client.extract(GLINER, [Item(text=t, id=f"t{i}") for i, t in enumerate(EXTRACT_TEXTS)],
                          labels=EXTRACT_LABELS, options={"threshold": 0.4})
    info["one"] = dict(one)
    info["many"] = [{"id": r.get("id"), "entities": r["entities"], "model": r.get("model")} for r in many]
    for bad in ({"labels": None}, {"labels": []}):
        try:
            client.extract(GLINER, Item(text="x"), **bad)
            info.setdefault("errors", []).append("no error")
        except RequestError as err:
            info.setdefault("errors", []).append(type(err).__name__)

    from sie_langchain import SIEExtractor as LangchainExtractor
    tool = LangchainExtractor(base_url=url, model=GLINER, labels=EXTRACT_LABELS,
                              options={"threshold": 0.4})
    info["langchain"] = tool.invoke(EXTRACT_TEXTS[0])
    from sie_llamaindex import create_sie_extractor_tool
    fn = create_sie_extractor_tool(base_url=url, model=GLINER, labels=EXTRACT_LABELS,
                                   options={"threshold": 0.4})
    info["llamaindex"] = fn.call(EXTRACT_TEXTS[0]).raw_output
    import tempfile

    import lancedb as ldb
    from sie_lancedb import SIEExtractor as LanceExtractor

    lance = LanceExtractor(base_url=url, model=GLINER, options={"threshold": 0.4})
    info["lancedb"] = lance.extract(EXTRACT_TEXTS, labels=EXTRACT_LABELS)
    table = ldb.connect(tempfile.mkdtemp()).create_table(
        "docs", data=[{"id": i, "text": t} for i, t in enumerate(EXTRACT_TEXTS)])
    lance.enrich_table(table, source_column="text", target_column="entities",
                       labels=EXTRACT_LABELS, id_column="id")
    rows = sorted(table.to_arrow().to_pylist(), key=lambda r: r["id"])
    info["lancedb_table"] = [r["entities"] for r in rows]


def extract_more(url: str, arrays: dict, info: dict) -> None:
    """The extractor components of sie-haystack, sie-dspy and sie-crewai (their own environment,
    scripts/setup-sie-public.sh extract), as their documentation shows them."""
    options = {"threshold": 0.4}
    text = EXTRACT_TEXTS[0]
    from sie_haystack import SIEExtractor as HaystackExtractor

    out = HaystackExtractor(base_url=url, model=GLINER, labels=EXTRACT_LABELS, options=options).run(text)
    info["haystack"] = [vars(e) if not isinstance(e, dict) else e for e in out["entities"]]
    from sie_dspy import SIEExtractor as DspyExtractor

    info["dspy"] = DspyExtractor(base_url=url, model=GLINER, labels=EXTRACT_LABELS,
                                 options=options)(text=text).entities_dict
    from sie_crewai import SIEExtractorTool

    info["crewai"] = SIEExtractorTool(base_url=url, model=GLINER, labels=EXTRACT_LABELS,
                                      options=options)._run(text=text)


GLICLASS = "knowledgator/gliclass-small-v1.0"
GLICLASS_TEXTS = ["The team won the championship after a dramatic final.",
                  " ".join(["The match went to extra time and the crowd cheered loudly."] * 150)]
GLICLASS_LABELS = ["sports", "economy", "technology", "weather", "politics"]


def gliclass(url: str, arrays: dict, info: dict) -> None:
    """The public SDK's `extract` on a GLiClass model, a text too long for its window beside a
    short one, under each of SIE's overflow policies (an item error comes back in the item)."""
    client = SIEClient(url)
    info["texts"], info["labels"] = GLICLASS_TEXTS, GLICLASS_LABELS
    for policy in ("default", "truncate_text", "error"):
        got = client.extract(GLICLASS, [Item(text=t) for t in GLICLASS_TEXTS],
                             labels=GLICLASS_LABELS, options={"overflow_policy": policy})
        info[policy] = [{"classifications": r["classifications"], "error": r.get("error")}
                        for r in got]


CHECKS = {f.__name__: f for f in (snippet, dtypes, raw_vectors, score_and_models, score_modes,
                                  loading, langchain, llamaindex, qdrant, lancedb, extract,
                                  extract_more, gliclass)}


def main() -> None:
    check, url, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    arrays: dict = {}
    info: dict = {}
    CHECKS[check](url, arrays, info)
    np.savez(out / f"{check}.npz", **arrays)
    (out / f"{check}.json").write_text(json.dumps(info, default=str))


if __name__ == "__main__":
    main()
