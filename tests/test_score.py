"""Scoring: cross-encoders against transformers, BGE-M3 scores against FlagEmbedding, the
scheduler path (query encoded once, token-budget batches), the 400s, and the HTTP route through
a real server process with the SDK."""

from __future__ import annotations

import asyncio
import json
import shutil
from functools import lru_cache
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import reference
from sie_sdk import InvalidRequestError, Item, SIEAsyncClient, SIEClient
from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.errors import InputTooLong, InvalidRequest
from sie_server.models.cross_encoder import config_activation
from texts import BERT_SPECIAL_TOKEN_TEXTS, LONG_TEXTS, SHORT_TEXTS, SPECIAL_TOKEN_TEXTS

CE_MAX = 64  # both test cross-encoders take 64 tokens per pair (tiny position tables)
MINILM = "sentence-transformers/all-MiniLM-L6-v2"

QUERIES = ["What is the capital of France?",
           "the cat sat on the mat",
           "Москва столица России"]
DOCS = [*SHORT_TEXTS[:10],
        "the cat sat on the mat with the other cat and the dog",
        "Paris is the capital of France and the cat of Paris sat on a mat.",
        "Москва — столица России. Moscow is the capital of Russia.",
        "",
        LONG_TEXTS[0]]  # ~0.7k tokens: truncated by the cross-encoders, whole for BGE-M3
# special tokens typed into queries and items (issue 12), per tokenizer family
SPECIAL_QUERIES = {"bert": "what does [MASK] mean after [SEP] and [PAD] [PAD]? [UNK]",
                   "xlmr": "<s>what</s> does <mask> mean <pad><pad> here? <unk>"}
SPECIAL_DOCS = {"bert": BERT_SPECIAL_TOKEN_TEXTS, "xlmr": SPECIAL_TOKEN_TEXTS}


# ---------------------------------------------------------------- test models

def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits differ clearly between pairs (HF's N(0, 0.02) init
    gives nearly equal logits, which would make rank comparisons meaningless)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + torch.randn(p.shape, generator=g) * 0.05)
            elif p.dim() == 2:
                std = 0.5 if "embeddings" in name else 1.0 / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.fixture(scope="module")
def ce_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BertForSequenceClassification, num_labels=1, all-MiniLM-L6-v2's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("ce-bert")
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=CE_MAX, type_vocab_size=2,
                     num_labels=1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    _randomize(model, 1)
    model.save_pretrained(out, safe_serialization=True)
    src = reference.minilm_dir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / f, out / f)
    return out


@pytest.fixture(scope="module")
def ce_xlmr_dir(tmp_path_factory: pytest.TempPathFactory, bge_m3_dir: Path) -> Path:
    """XLMRobertaForSequenceClassification, num_labels=1, the real XLM-R tokenizer (as the
    BGE-M3 test model carries it, with its tokenizer_config.json)."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    out = tmp_path_factory.mktemp("ce-xlmr")
    cfg = XLMRobertaConfig(vocab_size=250002, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=CE_MAX + 2, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, num_labels=1)
    torch.manual_seed(0)
    model = XLMRobertaForSequenceClassification(cfg).eval()
    _randomize(model, 2)
    model.save_pretrained(out, safe_serialization=True)
    assert reference.xlmr_tokenizer_json().is_file()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bge_m3_dir / f, out / f)
    return out


@lru_cache(maxsize=8)
def hf_logits(folder: str, query: str, docs: tuple[str, ...]) -> np.ndarray:
    """transformers' AutoTokenizer + AutoModelForSequenceClassification, truncation only_second."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    enc = tok([query] * len(docs), list(docs), truncation="only_second", max_length=CE_MAX,
              padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc).logits[:, 0].numpy()


@lru_cache(maxsize=8)
def flag_scores(folder: str, query: str, docs: tuple[str, ...],
                weights: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """FlagEmbedding's compute_score parts; `hybrid` is SIE's weighted SUM of them (SIE's
    bge_m3_score_mixin; FlagEmbedding's own "colbert+sparse+dense" divides by the weights'
    sum, equal for the default weights, which sum to 1)."""
    ref = reference.flag_compute_score(folder, [(query, d) for d in docs], weights=weights)
    parts = {k: np.asarray(ref[k], np.float64) for k in ("dense", "sparse", "colbert")}
    hybrid = sum(w * parts[k] for w, k in zip(weights, ("dense", "sparse", "colbert")))
    if sum(weights) == 1.0:
        np.testing.assert_allclose(hybrid, ref["colbert+sparse+dense"], atol=1e-6)
    return {**parts, "hybrid": hybrid}


@pytest.fixture(scope="module")
def engine(bge_m3_dir: Path, ce_bert_dir: Path, ce_xlmr_dir: Path):
    # a small token budget: every request below is split over several batches
    eng = Engine(Settings(device="cpu", dtype="float32", max_batch_tokens=256, default_models=[],
                          models={"m3": str(bge_m3_dir), "ce-bert": str(ce_bert_dir),
                                  "ce-xlmr": str(ce_xlmr_dir)}))
    yield eng
    eng.close()


def spy_batches(monkeypatch: pytest.MonkeyPatch, engine: Engine, model: str) -> list:
    """Record every PackedBatch the model runs."""
    m = engine.registry.get(model).model
    seen: list = []
    forward = m.forward

    def recording(batch):
        seen.append(batch)
        return forward(batch)

    monkeypatch.setattr(m, "forward", recording)
    return seen


# ---------------------------------------------------------------- cross-encoders

@pytest.mark.parametrize("name", ["ce-bert", "ce-xlmr"])
def test_cross_encoder_pairs_tokenized_like_transformers(engine, name, ce_bert_dir, ce_xlmr_dir):
    from transformers import AutoTokenizer

    folder = ce_bert_dir if name == "ce-bert" else ce_xlmr_dir
    m = engine.registry.get(name).model
    hf = AutoTokenizer.from_pretrained(str(folder))
    for q in QUERIES:
        _, tok = m.prepare_pairs(q, DOCS)
        enc = hf([q] * len(DOCS), DOCS, truncation="only_second", max_length=CE_MAX)
        assert [t.tolist() for t in tok.ids] == enc["input_ids"]
        if name == "ce-bert":
            assert [t.tolist() for t in tok.type_ids] == enc["token_type_ids"]
            assert {1} <= set(np.concatenate(tok.type_ids).tolist())
        else:
            assert tok.type_ids is None  # one token type: all zeros, as HF's XLM-R tokenizer


@pytest.mark.parametrize("name", ["ce-bert", "ce-xlmr"])
def test_cross_encoder_logits_match_transformers(engine, monkeypatch, name, ce_bert_dir,
                                                 ce_xlmr_dir):
    folder = str(ce_bert_dir if name == "ce-bert" else ce_xlmr_dir)
    batches = spy_batches(monkeypatch, engine, name)
    for q in QUERIES:
        res = engine.score(name, q, DOCS, {"activation": "none"})
        ref = hf_logits(folder, q, tuple(DOCS))
        assert res.score_mode == "relevance" and res.activation == "none"
        np.testing.assert_allclose(res.scores, ref, atol=1e-4, rtol=0)
        assert res.order.tolist() == np.argsort(-ref, kind="stable").tolist()
        assert np.ptp(ref) > 0.1  # the logits really differ between pairs
    m = engine.registry.get(name).model
    _, tok = m.prepare_pairs(QUERIES[0], DOCS)
    assert max(tok.original_lengths) > CE_MAX  # some pairs were truncated (cut in the item)
    # pairs were scheduled one per sequence and split by the 256-token budget
    assert sum(b.num_seqs for b in batches) == len(QUERIES) * len(DOCS)
    assert len(batches) >= 2 * len(QUERIES) and all(b.num_tokens <= 256 for b in batches)


def test_cross_encoder_max_seq_length_matches_transformers_at_that_length(engine, ce_bert_dir):
    """SIE's per-request `max_seq_length` on a cross-encoder (SIE's: the pair's max_length):
    transformers' logits with truncation only_second at that length (1e-4); a query that
    leaves no room under it is a 400 naming query.text; "24" is 24 (SIE's `int(value)`) and
    "24.5" a 400 naming options.max_seq_length."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ce_bert_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(ce_bert_dir)).eval()
    q, short = QUERIES[0], 24
    enc = tok([q] * len(DOCS), DOCS, truncation="only_second", max_length=short, padding=True,
              return_tensors="pt")
    with torch.inference_mode():
        ref = model(**enc).logits[:, 0].numpy()
    res = engine.score("ce-bert", q, DOCS, {"activation": "none", "max_seq_length": short})
    np.testing.assert_allclose(res.scores, ref, atol=1e-4, rtol=0)
    assert np.abs(res.scores - hf_logits(str(ce_bert_dir), q, tuple(DOCS))).max() > 1e-3
    as_text = engine.score("ce-bert", q, DOCS, {"activation": "none", "max_seq_length": "24"})
    np.testing.assert_allclose(as_text.scores, ref, atol=1e-4, rtol=0)
    with pytest.raises(InvalidRequest, match="options.max_seq_length must be a positive"):
        engine.score("ce-bert", q, DOCS, {"max_seq_length": "24.5"})
    with pytest.raises(InputTooLong, match="query.text"):
        engine.score("ce-bert", "word " * 40, DOCS[:1], {"max_seq_length": 8})


@pytest.mark.parametrize("name", ["ce-bert", "ce-xlmr"])
def test_cross_encoder_special_token_texts_match_transformers(engine, name, ce_bert_dir,
                                                              ce_xlmr_dir):
    """Typed special tokens in the query and the items: same ids and logits as transformers."""
    from transformers import AutoTokenizer

    folder = str(ce_bert_dir if name == "ce-bert" else ce_xlmr_dir)
    kind = name.removeprefix("ce-")
    docs, m = SPECIAL_DOCS[kind], engine.registry.get(name).model
    hf = AutoTokenizer.from_pretrained(folder)
    for q in (QUERIES[0], SPECIAL_QUERIES[kind]):
        _, tok = m.prepare_pairs(q, docs)
        enc = hf([q] * len(docs), docs, truncation="only_second", max_length=CE_MAX)
        assert [t.tolist() for t in tok.ids] == enc["input_ids"]
        res = engine.score(name, q, docs, {"activation": "none"})
        np.testing.assert_allclose(res.scores, hf_logits(folder, q, tuple(docs)), atol=1e-4,
                                   rtol=0, err_msg=q)


def test_cross_encoder_activation_and_top_k(engine):
    q = QUERIES[0]
    raw = engine.score("ce-bert", q, DOCS)  # no ST config, no catalog setting: the raw logit
    assert raw.activation == "none"
    sig = engine.score("ce-bert", q, DOCS, {"activation": "sigmoid"}, top_k=3)
    np.testing.assert_allclose(sig.scores, 1 / (1 + np.exp(-raw.scores.astype(np.float64))),
                               atol=1e-6)
    assert sig.order.tolist() == raw.order[:3].tolist()


def test_config_activation():
    assert config_activation({}) == "none"
    assert config_activation({"sbert_ce_default_activation_function":
                              "torch.nn.modules.activation.Sigmoid"}) == "sigmoid"
    assert config_activation({"sbert_ce_default_activation_function":
                              "torch.nn.modules.linear.Identity"}) == "none"
    assert config_activation({"sentence_transformers":
                              {"activation_fn": "torch.nn.modules.activation.Sigmoid"}}) == "sigmoid"


def test_cross_encoder_sigmoid_from_config(tmp_path, ce_bert_dir):
    folder = tmp_path / "ce"
    shutil.copytree(ce_bert_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["sbert_ce_default_activation_function"] = "torch.nn.modules.activation.Sigmoid"
    (folder / "config.json").write_text(json.dumps(cfg))
    eng = Engine(Settings(device="cpu", dtype="float32", default_models=[],
                          models={"ce": str(folder)}))
    try:
        res = eng.score("ce", QUERIES[0], DOCS[:4])
        assert res.activation == "sigmoid" and ((res.scores > 0) & (res.scores < 1)).all()
        assert eng.score("ce", QUERIES[0], DOCS[:4], {"activation": "none"}).activation == "none"
    finally:
        eng.close()


# ---------------------------------------------------------------- BGE-M3

MODES = ("dense", "sparse", "colbert")


@pytest.mark.parametrize("weights", [(0.4, 0.2, 0.4), (1.0, 0.5, 0.25)])
def test_bge_m3_scores_match_flagembedding(engine, bge_m3_dir, weights):
    opts = {"score_mode": "hybrid", "score_weights": dict(zip(MODES, weights))}
    for q in QUERIES:
        ref = flag_scores(str(bge_m3_dir), q, tuple(DOCS), weights)
        res = engine.score("m3", q, DOCS, opts)
        assert res.score_mode == "hybrid"
        assert res.score_weights == opts["score_weights"]
        for key in (*MODES, "hybrid"):
            np.testing.assert_allclose(res.components[key], ref[key], atol=1e-4, rtol=0,
                                       err_msg=key)
        np.testing.assert_array_equal(res.scores, res.components["hybrid"])
        assert res.order.tolist() == np.argsort(-res.scores, kind="stable").tolist()
    # the sparse score is really exercised (shared tokens with positive weights)
    sparse = flag_scores(str(bge_m3_dir), QUERIES[1], tuple(DOCS), weights)["sparse"]
    assert (sparse > 0).sum() >= 2


def test_bge_m3_score_instruction_goes_to_the_query_and_the_items(engine, bge_m3_dir):
    """SIE's BGE-M3 score encodes the query and every item with the instruction (its
    bge_m3_score_mixin), through the model's instruction template: FlagEmbedding's scores of
    the instructed texts."""
    template = engine.registry.get("m3").model.spec.instruction_template
    task = "Find the clause"
    ref = flag_scores(str(bge_m3_dir), template.format(instruction=task, text=QUERIES[0]),
                      tuple(template.format(instruction=task, text=d) for d in DOCS),
                      (0.4, 0.2, 0.4))
    res = engine.score("m3", QUERIES[0], DOCS, {"score_mode": "hybrid", "instruction": task})
    plain = engine.score("m3", QUERIES[0], DOCS, {"score_mode": "hybrid"})
    for key in (*MODES, "hybrid"):
        np.testing.assert_allclose(res.components[key], ref[key], atol=1e-4, rtol=0,
                                   err_msg=key)
    assert np.abs(res.components["dense"] - plain.components["dense"]).max() > 1e-3


def test_bge_m3_scores_on_special_token_texts_match_flagembedding(engine, bge_m3_dir):
    weights = (0.4, 0.2, 0.4)
    docs = tuple(SPECIAL_TOKEN_TEXTS)
    for q in (QUERIES[0], SPECIAL_QUERIES["xlmr"]):
        ref = flag_scores(str(bge_m3_dir), q, docs, weights)
        res = engine.score("m3", q, list(docs), {"score_mode": "hybrid"})
        for key in (*MODES, "hybrid"):
            np.testing.assert_allclose(res.components[key], ref[key], atol=1e-4, rtol=0,
                                       err_msg=f"{q!r} {key}")


@pytest.mark.parametrize("mode", [None, "dense", "sparse", "colbert", "hybrid"])
def test_bge_m3_score_mode_ranks(engine, bge_m3_dir, monkeypatch, mode):
    """Each mode ranks by its own score (SIE's default: dense), and encodes only the outputs
    it compares."""
    q = QUERIES[1]
    ref = flag_scores(str(bge_m3_dir), q, tuple(DOCS), (0.4, 0.2, 0.4))
    batches = spy_batches(monkeypatch, engine, "m3")
    res = engine.score("m3", q, DOCS, None if mode is None else {"score_mode": mode}, top_k=5)
    want = mode or "dense"
    assert res.score_mode == want
    assert set(res.components) == ({*MODES, "hybrid"} if want == "hybrid" else {want})
    outputs = {"dense": {"dense"}, "sparse": {"sparse"}, "colbert": {"multivector"},
               "hybrid": {"dense", "sparse", "multivector"}}[want]
    assert all(b.output_types == outputs for b in batches)
    np.testing.assert_allclose(res.scores, ref[want], atol=1e-4, rtol=0)
    top = res.scores[res.order]
    assert len(res.order) == 5 and (np.diff(top) <= 0).all()
    assert top[0] == res.scores.max()


def test_bge_m3_zero_weight_skips_its_output(engine, bge_m3_dir, monkeypatch):
    """SIE: an output weighted 0 is not computed; the others keep their default weights."""
    batches = spy_batches(monkeypatch, engine, "m3")
    res = engine.score("m3", QUERIES[1], DOCS, {"score_mode": "hybrid",
                                                "score_weights": {"sparse": 0}})
    assert all(b.output_types == {"dense", "multivector"} for b in batches)
    assert res.score_weights == {"dense": 0.4, "sparse": 0.0, "colbert": 0.4}
    ref = flag_scores(str(bge_m3_dir), QUERIES[1], tuple(DOCS), (0.4, 0.0, 0.4))
    np.testing.assert_allclose(res.scores, ref["hybrid"], atol=1e-4, rtol=0)
    assert set(res.components) == {"dense", "colbert", "hybrid"}


def test_bge_m3_query_encoded_once_per_request(engine, monkeypatch):
    batches = spy_batches(monkeypatch, engine, "m3")
    assert QUERIES[1] not in DOCS
    engine.score("m3", QUERIES[1], DOCS)
    m = engine.registry.get("m3").model
    q_ids = m.prepare([QUERIES[1]], True, None).ids[0]
    seqs = [b.input_ids[b.cu_seqlens[i]:b.cu_seqlens[i + 1]]
            for b in batches for i in range(b.num_seqs)]
    assert len(seqs) == 1 + len(DOCS)
    assert sum(np.array_equal(s, q_ids) for s in seqs) == 1
    assert len(batches) >= 2  # the 0.7k-token item alone overflows the 256-token budget


def test_score_errors(engine, minilm_dir):
    eng = Engine(Settings(dtype="float32", device="cpu", default_models=[], models={MINILM: str(minilm_dir)}))
    try:
        with pytest.raises(InvalidRequest, match="cannot score"):
            eng.score(MINILM, "q", ["a"])
    finally:
        eng.close()
    cases = [
        ("m3", "q", [], {}, "items"),
        ("m3", "q", ["a"], {"score_type": "relevance"}, "options.score_mode"),
        ("m3", "q", ["a"], {"activation": "sigmoid"}, "options.activation"),
        ("m3", "q", ["a"], {"score_mode": "bm25"}, "Invalid score_mode 'bm25'. Expected one of "
                                                   "['colbert', 'dense', 'hybrid', 'sparse']."),
        ("m3", "q", ["a"], {"score_weights": {"dense": -1}},
         "score_weights['dense'] must be a non-negative number, got -1"),
        ("m3", "q", ["a"], {"score_weights": {"dense": float("nan")}}, "score_weights['dense']"),
        ("m3", "q", ["a"], {"score_weights": {"multivector": 1}},
         "Unknown score_weights keys: ['multivector']. Allowed: dense, sparse, colbert"),
        ("m3", "q", ["a"], {"score_weights": [1]}, "score_weights must be a mapping"),
        ("m3", "q", ["a"], {"score_mode": "hybrid",
                            "score_weights": {"dense": 0, "sparse": 0, "colbert": 0}},
         "score_weights for hybrid mode must contain at least one positive weight"),
        ("m3", "q", ["a"], {"weights": {"dense": 1}}, "options.weights is now options.score_weights"),
        ("m3", "q", ["a"], {"score_type": "sparse", "score_mode": "dense"}, "options.score_type"),
        ("m3", "q", ["a"], {"bogus": 1}, "options.bogus"),
        ("ce-bert", "q", ["a"], {"score_weights": {"dense": 1}}, "options.score_weights"),
        ("ce-bert", "q", ["a"], {"score_mode": "hybrid"}, "options.score_mode"),
        ("ce-bert", "q", ["a"], {"activation": "softmax"}, "options.activation"),
    ]
    for model, q, items, opts, message in cases:
        with pytest.raises(InvalidRequest) as err:
            engine.score(model, q, items, opts)
        assert err.value.message.startswith(message), (opts, err.value.message)
    # the older score_type names the same modes
    for alias, mode in (("multivector", "colbert"), ("hybrid", "hybrid"), ("sparse", "sparse")):
        assert engine.score("m3", "q", ["a"], {"score_type": alias}).score_mode == mode
    with pytest.raises(InvalidRequest, match="top_k"):
        engine.score("m3", "q", ["a"], top_k=0)
    with pytest.raises(InvalidRequest, match="does not encode"):
        engine.encode("ce-bert", ["a"])
    with pytest.raises(InputTooLong, match=r"query\.text"):
        engine.score("ce-bert", "word " * 80, ["a"])
    with pytest.raises(InputTooLong, match=r"items\[1\]\.text"):
        engine.score("ce-bert", "q", ["a", LONG_TEXTS[0]], {"truncate": False})


# ---------------------------------------------------------------- HTTP, real server, SDK

@pytest.fixture(scope="module")
def score_server(start_module_server, bge_m3_dir, ce_bert_dir, ce_xlmr_dir, minilm_dir):
    return start_module_server(["--model", f"BAAI/bge-m3={bge_m3_dir}",
                         "--model", f"test/ce-bert={ce_bert_dir}",
                         "--model", f"test/ce-xlmr={ce_xlmr_dir}",
                         "--model", f"{MINILM}={minilm_dir}",
                         "--default-model", "BAAI/bge-m3", "--default-model", "test/ce-bert",
                         "--default-model", "test/ce-xlmr", "--max-batch-tokens", "256"])


def test_score_end_to_end_sdk(score_server, bge_m3_dir, ce_bert_dir, ce_xlmr_dir):
    q = QUERIES[1]
    items = [Item(text=d, id=f"doc-{i}") if i % 2 == 0 else d for i, d in enumerate(DOCS)]
    ids = [f"doc-{i}" if i % 2 == 0 else f"item-{i}" for i in range(len(DOCS))]  # SIE's default id
    ref = flag_scores(str(bge_m3_dir), q, tuple(DOCS), (0.4, 0.2, 0.4))
    with SIEClient(score_server.url) as client:
        res = client.score("BAAI/bge-m3", q, items, {"score_mode": "hybrid"}, top_k=4)
        assert res["model"] == "BAAI/bge-m3" and res["score_mode"] == "hybrid"
        assert res["score_weights"] == {"dense": 0.4, "sparse": 0.2, "colbert": 0.4}
        want = np.argsort(-ref["hybrid"], kind="stable")[:4]
        assert [s["item_id"] for s in res["scores"]] == [ids[i] for i in want]
        assert [s["rank"] for s in res["scores"]] == [0, 1, 2, 3]
        for s, i in zip(res["scores"], want):
            assert abs(s["score"] - ref["hybrid"][i]) < 1e-4
            for key in (*MODES, "hybrid"):
                assert abs(s["components"][key] - ref[key][i]) < 1e-4

        res = client.score("BAAI/bge-m3", q, DOCS, {"score_mode": "sparse"})
        assert res["score_mode"] == "sparse" and len(res["scores"]) == len(DOCS)
        got = {s["item_id"]: s["score"] for s in res["scores"]}
        np.testing.assert_allclose([got[f"item-{i}"] for i in range(len(DOCS))], ref["sparse"], atol=1e-4)
        t = res["timing"]
        assert min(t.values()) >= 0
        assert t["queue_ms"] + t["tokenization_ms"] + t["inference_ms"] + t["postprocessing_ms"] \
            <= t["total_ms"] + 1e-3

        with pytest.raises(InvalidRequestError, match="cannot score"):
            client.score(MINILM, q, DOCS[:2])
        with pytest.raises(InvalidRequestError, match="Invalid score_mode"):
            client.score("BAAI/bge-m3", q, DOCS[:2], {"score_mode": "bm25"})

    async def rerank() -> None:
        async with SIEAsyncClient(score_server.url) as client:
            for name, folder in (("test/ce-bert", ce_bert_dir), ("test/ce-xlmr", ce_xlmr_dir)):
                res = await client.score(name, QUERIES[0], DOCS)
                logits = hf_logits(str(folder), QUERIES[0], tuple(DOCS))
                assert res["score_mode"] == "relevance" and res["activation"] == "none"
                order = np.argsort(-logits, kind="stable")
                assert [s["item_id"] for s in res["scores"]] == [f"item-{i}" for i in order]
                np.testing.assert_allclose([s["score"] for s in res["scores"]], logits[order],
                                           atol=1e-4)

    asyncio.run(rerank())


def test_score_http_validation(score_server):
    url = f"{score_server.url}/v1/score/BAAI/bge-m3"
    cases = [
        ({"items": [{"text": "a"}]}, "query"),
        ({"query": {"id": "q"}, "items": [{"text": "a"}]}, "query.text"),
        ({"query": {"text": "q"}, "items": []}, "items"),
        ({"query": {"text": "q"}}, "items"),
        ({"query": {"text": "q"}, "items": [{"text": "a"}, {"id": "x"}]}, "items[1].text"),
        ({"query": {"text": "q"}, "items": [{"text": "a"}], "top_k": 0}, "top_k"),
        ({"query": {"text": "q"}, "items": [{"text": "a"}], "topk": 1}, "body.topk"),
    ]
    for body, field in cases:
        r = httpx.post(url, json=body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["detail"]
        assert err["code"] == "INVALID_INPUT" and err["message"].startswith(field), err
    # JSON in, JSON out; "item-{position}" is the item_id without an id (SIE's default)
    r = httpx.post(f"{score_server.url}/v1/score/test/ce-xlmr",
                   json={"query": {"text": "q"}, "items": [{"text": "a"}, {"text": "b", "id": "B"}],
                         "options": {"activation": "sigmoid"}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["activation"] == "sigmoid" and {s["item_id"] for s in body["scores"]} == {"item-0", "B"}
    r = httpx.get(f"{score_server.url}/v1/models").json()["models"]
    listed = {m["id"]: m for m in r}
    assert listed["test/ce-bert"]["score_modes"] == ["relevance"]
    assert listed["BAAI/bge-m3"]["score_modes"] == ["dense", "sparse", "colbert", "hybrid"]
