"""ModernBERT against transformers 4.57 on the same weights (CPU, fp32).

Models: the small ModernBERT folders of scripts/make_modernbert_test_models.py (hub layout,
local window 32 tokens so most test texts exceed it, positions up to 1,024 tokens).
References: sentence-transformers 5.7 on the folder (`ModernBertModel` + its Pooling and
Normalize modules) for the dense models, `ModernBertForSequenceClassification` for the
reranker; both with attn_implementation="eager" (no flash-attn here: transformers builds the
sliding-window mask itself, as its sdpa path does).

Tolerances: dense cosine >= 0.99999; reranker logits within 1e-4; a text packed with others
equals it alone (cosine >= 0.99999).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from make_modernbert_test_models import DOCUMENT_PROMPT, LOCAL_ATTENTION, MAX_POS, QUERY_PROMPT, build
from texts import LONG_TEXTS, SHORT_TEXTS, TEXTS

from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.engine.catalog import detect_family, load_catalog

EAGER = {"attn_implementation": "eager"}
QUERIES = ["What is the capital of France?", "Москва столица России", "東京の人口は？"]
DOCS = [*SHORT_TEXTS[:12], "", LONG_TEXTS[0]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modernbert")
    out = {"gte": build(root / "gte", "gte", seed=0),
           "embed": build(root / "embed", "embed", seed=1),
           "rerank-mean": build(root / "rerank-mean", "reranker", seed=2, pooling="mean")}
    cls = root / "rerank-cls"
    shutil.copytree(out["rerank-mean"], cls)
    cfg = json.loads((cls / "config.json").read_text())
    (cls / "config.json").write_text(json.dumps({**cfg, "classifier_pooling": "cls"}))
    out["rerank-cls"] = cls
    return out


def st_model(folder: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", model_kwargs=EAGER)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_folders_have_the_hub_layout(folders: dict[str, Path]) -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification

    _, info = AutoModel.from_pretrained(folders["gte"], output_loading_info=True, **EAGER)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _, info = AutoModelForSequenceClassification.from_pretrained(
        folders["rerank-mean"], output_loading_info=True, **EAGER)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert detect_family(str(folders["gte"])) == "modernbert"
    assert detect_family(str(folders["rerank-mean"])) == "modernbert-cross-encoder"


def test_catalog_entries() -> None:
    specs, _ = load_catalog([])
    assert specs["Alibaba-NLP/gte-modernbert-base"].family == "modernbert"
    embed = specs["nomic-ai/modernbert-embed-base"]
    assert embed.family == "modernbert" and embed.matryoshka
    assert (embed.query_prefix, embed.document_prefix) == (QUERY_PROMPT, DOCUMENT_PROMPT)
    assert specs["Alibaba-NLP/gte-reranker-modernbert-base"].family == "modernbert-cross-encoder"


@pytest.mark.parametrize("name", ["gte", "embed"])  # CLS pooling, mean pooling
def test_dense_equals_sentence_transformers(engine, folders, name) -> None:
    got = engine.encode(name, TEXTS)
    ours = np.stack([r.dense for r in got])
    # items are documents unless is_query: the document prompt (none for gte)
    prompt = "document" if name == "embed" else None
    ref = st_model(folders[name]).encode(TEXTS, batch_size=16, prompt_name=prompt,
                                         convert_to_numpy=True)
    cos = cosines(ours, ref)
    assert cos.min() >= 0.99999, f"worst cosine {cos.min()} at text {int(cos.argmin())}"
    counts = np.array([r.token_count for r in got])
    # local attention really restricts: most texts are longer than the window, some are
    # truncated at the position limit
    assert (counts > LOCAL_ATTENTION // 2 + 1).mean() > 0.8
    assert sum(r.truncated for r in got) >= 2 and counts.max() == MAX_POS


def test_packed_batches_equal_texts_alone(engine) -> None:
    together = np.stack([r.dense for r in engine.encode("gte", TEXTS)])
    alone = np.stack([engine.encode("gte", [t])[0].dense for t in TEXTS])
    assert cosines(together, alone).min() >= 0.99999


def test_prompts_from_the_sentence_transformers_config(engine, folders) -> None:
    m = engine.registry.get("embed").model
    assert (m.spec.query_prefix, m.spec.document_prefix) == (QUERY_PROMPT, DOCUMENT_PROMPT)
    st = st_model(folders["embed"])
    texts = SHORT_TEXTS[:16]
    for is_query, prompt in ((True, "query"), (False, "document")):
        ours = np.stack([r.dense for r in engine.encode("embed", texts, None,
                                                        {"is_query": is_query})])
        ref = st.encode(texts, prompt_name=prompt, convert_to_numpy=True)
        assert cosines(ours, ref).min() >= 0.99999, prompt
    plain = st.encode(texts[:1], convert_to_numpy=True)
    assert float(cosines(ours[:1], plain)[0]) < 0.9999  # the prompt changes the vector


@pytest.mark.parametrize("name", ["rerank-mean", "rerank-cls"])
def test_reranker_matches_transformers(folders, name) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # a small token budget: pairs of one request go through several packed batches
    eng = Engine(Settings(dtype="float32", device="cpu", default_models=[], max_batch_tokens=512,
                          models={name: str(folders[name])}))
    tok = AutoTokenizer.from_pretrained(str(folders[name]))
    hf = AutoModelForSequenceClassification.from_pretrained(str(folders[name]), **EAGER).eval()
    try:
        m = eng.registry.get(name).model
        for q in QUERIES:
            enc = tok([q] * len(DOCS), DOCS, truncation="only_second", max_length=MAX_POS,
                      padding=True, return_tensors="pt")
            _, pairs = m.prepare_pairs(q, DOCS)
            mask = enc["attention_mask"].bool()
            assert [p.tolist() for p in pairs.ids] == [
                ids[keep].tolist() for ids, keep in zip(enc["input_ids"], mask)]
            with torch.inference_mode():
                ref = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0]
            res = eng.score(name, q, DOCS, {"activation": "none"})
            np.testing.assert_allclose(res.scores, ref.numpy(), atol=1e-4, rtol=0)
            assert np.ptp(ref.numpy()) > 0.1  # the logits really differ between pairs
    finally:
        eng.close()


def test_bfloat16_on_cpu_stays_close(folders, engine) -> None:
    want = np.stack([r.dense for r in engine.encode("gte", SHORT_TEXTS)])
    eng = Engine(Settings(device="cpu", dtype="bfloat16", default_models=[],
                          models={"gte": str(folders["gte"])}))
    try:
        got = np.stack([r.dense for r in eng.encode("gte", SHORT_TEXTS)])
    finally:
        eng.close()
    assert cosines(got, want).min() >= 0.999



def test_windowed_attention_equals_a_banded_mask_per_sequence() -> None:
    """make_attention(window=w) on a packed batch (groups with padding) equals SDPA on each
    sequence alone with the mask |i - j| <= w, as transformers builds it."""
    import torch.nn.functional as F

    from sie_server.runtime.attention import BucketedAttention

    lengths = [1, 5, 9, 10, 30, 33, 64, 70]
    cu = np.r_[0, np.cumsum(lengths)]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(int(cu[-1]), 2, 8, generator=g) for _ in range(3))
    cpu = torch.device("cpu")
    for slack in (None, 1.25, 3.0):  # CPU's one-length groups, and groups with padding
        att = BucketedAttention(cu, cpu, window=8, slack=slack)
        assert (len(att.groups) == len(lengths)) == (slack is None), slack
        got = att(q, k, v)
        full = BucketedAttention(cu, cpu, slack=slack)(q, k, v)
        for s, e in zip(cu[:-1], cu[1:]):
            pos = torch.arange(e - s)
            band = (pos[:, None] - pos[None, :]).abs() <= 8
            ref = F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)),
                                                 attn_mask=band).transpose(0, 1)
            torch.testing.assert_close(got[s:e], ref, atol=1e-6, rtol=0)
            if e - s > 9:  # longer than the window: the band changes the result
                assert not torch.allclose(got[s:e], full[s:e], atol=1e-3)


def test_http_encode_score_and_openai_dimensions(start_server, folders) -> None:
    """A real server: the catalog's ModernBERT entries served from the test folders."""
    import httpx

    from sie_sdk import Item, SIEClient

    embed, rerank = "nomic-ai/modernbert-embed-base", "Alibaba-NLP/gte-reranker-modernbert-base"
    server = start_server(["--model", f"{embed}={folders['embed']}",
                           "--model", f"{rerank}={folders['rerank-mean']}",
                           "--default-model", embed, "--default-model", rerank])
    texts = SHORT_TEXTS[:6]
    ref = st_model(folders["embed"]).encode(texts, prompt_name="query", convert_to_numpy=True)
    with SIEClient(server.url) as client:
        got = client.encode(embed, [Item(text=t) for t in texts], options={"is_query": True})
        assert cosines(np.stack([r["dense"] for r in got]), ref).min() >= 0.99999
        res = client.score(rerank, QUERIES[0], DOCS[:4], {"activation": "none"})
        assert len(res["scores"]) == 4
    body = {"model": embed, "input": texts[:2], "dimensions": 32}
    out = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=30).json()
    vec = np.array(out["data"][0]["embedding"], dtype=np.float32)
    assert vec.shape == (32,) and abs(float(np.linalg.norm(vec)) - 1) < 1e-5


def test_lora_adapters_match_peft_merged(folders, tmp_path) -> None:
    """PEFT adapters on Wqkv / attn.Wo / mlp.Wi / mlp.Wo against peft's merged model (CLS +
    normalize, as gte-modernbert); two adapters and the base model share packed batches."""
    from concurrent.futures import wait

    import torch.nn.functional as F
    from lora_adapters import hidden_states, make_adapter, tokenize

    base = folders["gte"]
    made = {"all": make_adapter(base, tmp_path / "all", r=4, seed=5,
                                targets=["Wqkv", "Wo", "Wi"]),
            "attn": make_adapter(base, tmp_path / "attn", r=8, seed=6, targets=["attn.Wqkv"])}
    texts = SHORT_TEXTS[:8] + [LONG_TEXTS[0]]
    ids = tokenize(base, texts, max_length=MAX_POS)
    eng = Engine(Settings(dtype="float32", device="cpu", default_models=[], adapter_roots=[tmp_path],
                          models={"gte": str(base)}))
    try:
        plain = np.stack([r.dense for r in eng.encode("gte", texts)])
        jobs = [(name, i) for i in range(len(texts)) for name in (*made, None)]
        futures = [eng.submit("gte", [texts[i]], None, {"lora_id": n} if n else None)
                   for n, i in jobs]
        wait(futures)
        for (name, i), f in zip(jobs, futures):
            got = f.result()[0].dense
            if name is None:
                assert float(got @ plain[i]) >= 0.99999
                continue
            ref = F.normalize(hidden_states(made[name]["merged"], ids[i])[0], dim=-1).numpy()
            assert float(got @ ref) >= 0.99999, (name, i)
            assert float(got @ plain[i]) < 0.9999  # the adapter changes the vector
    finally:
        eng.close()


def test_a_bert_adapter_is_refused_naming_the_modules(folders, tmp_path) -> None:
    from sie_server.errors import InvalidAdapter

    folder = tmp_path / "bert-style"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}))
    eng = Engine(Settings(dtype="float32", device="cpu", default_models=[], adapter_roots=[tmp_path],
                          models={"gte": str(folders["gte"])}))
    try:
        with pytest.raises(InvalidAdapter, match=r"\['query', 'value'\].*attn\.Wqkv"):
            eng.encode("gte", ["hello"], None, {"lora_id": "bert-style"})
    finally:
        eng.close()
