"""Decoder embedders and LLM rerankers against their references on the same weights (CPU, fp32).

Models: scripts/make_decoder_test_models.py (random weights, hub layouts). References:
`sentence_transformers.SentenceTransformer` on the saved folder (transformers' Qwen3Model /
Qwen2Model / MistralModel / LlamaModel + the folder's Pooling and Normalize) for embedders;
the Qwen3-Reranker model card's code on `Qwen3ForCausalLM` for the reranker.
Tolerances (issue 14): dense cosine >= 0.99999; reranker scores within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import make_decoder_test_models as makers
from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.engine.catalog import detect_family
from sie_server.errors import InputTooLong, InvalidRequest
from sie_server.models.llm_reranker import DEFAULT_INSTRUCTION, PREFIX, SUFFIX
from texts import LONG_TEXTS, SHORT_TEXTS, TEXTS

QWEN3_QUERY = makers.QWEN3_PROMPTS["query"]
QUERIES = ["What is the capital of France?", "Москва столица России", "how do cats sleep"]
DOCS = [*SHORT_TEXTS[:12], "", LONG_TEXTS[0]]
RR_MAX = 256  # the reranker's limit in these tests, so that LONG_TEXTS[0] gets truncated


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {v: makers.build(root / v, v) for v in makers.VARIANTS}


@pytest.fixture(scope="module")
def engine(folders):
    eng = Engine(Settings(dtype="float32", models={v: str(p) for v, p in folders.items()}, default_models=[],
                          device="cpu"))
    yield eng
    eng.close()


def st_encode(folder: Path, texts: list[str], **kwargs) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu",
                                model_kwargs={"attn_implementation": "sdpa"})
    return model.encode(texts, batch_size=4, convert_to_numpy=True, **kwargs)


def assert_cosines(ours: list, ref: np.ndarray, label: str) -> None:
    got = np.stack([r.dense for r in ours])
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99999, f"{label}: text {int(cos.argmin())} cosine {cos.min()}"


def test_families_are_detected(folders) -> None:
    assert detect_family(str(folders["qwen3-embedding"])) == "decoder-embedder"
    assert detect_family(str(folders["mistral-embedding"])) == "decoder-embedder"
    assert detect_family(str(folders["qwen3-reranker"])) == "llm-reranker"


def test_qwen3_embedder_equals_sentence_transformers(engine, folders) -> None:
    """All multilingual texts, long ones included (ST cuts at max_seq_length 8192, EOS kept)."""
    ours = engine.encode("qwen3-embedding", TEXTS)
    assert_cosines(ours, st_encode(folders["qwen3-embedding"], TEXTS), "documents")
    assert all(r.token_count <= 8192 for r in ours) and any(r.truncated for r in ours)
    model = engine.registry.get("qwen3-embedding").model
    eos = model.tokenizer.token_id("<|endoftext|>")  # appended; last-token pooling reads it
    assert all(ids[-1] == eos for ids in model.prepare(TEXTS, False, None).ids)


def test_qwen3_query_prompt_and_instruction(engine, folders) -> None:
    texts = SHORT_TEXTS[:20]
    ours = engine.encode("qwen3-embedding", texts, options={"is_query": True})
    assert_cosines(ours, st_encode(folders["qwen3-embedding"], texts, prompt_name="query"),
                   "queries")
    # the catalog's instruction_template for Qwen3 (no catalog here: set it on the spec)
    model = engine.registry.get("qwen3-embedding").model
    template = "Instruct: {instruction}\nQuery:{text}"
    object.__setattr__(model.spec, "instruction_template", template)
    ours = engine.encode("qwen3-embedding", texts,
                         options={"is_query": True, "instruction": "Find the language"})
    ref = st_encode(folders["qwen3-embedding"], texts, prompt="Instruct: Find the language\nQuery:")
    assert_cosines(ours, ref, "instruction")


def test_score_by_dense_cosine_with_the_query_prompt(engine, folders) -> None:
    """/v1/score on an embedder: the query encoded with its prompt, cosine with each item."""
    got = engine.score("qwen3-embedding", QUERIES[0], DOCS)
    q = st_encode(folders["qwen3-embedding"], [QUERIES[0]], prompt_name="query")[0]
    d = st_encode(folders["qwen3-embedding"], DOCS)
    assert got.score_mode == "dense"
    assert np.abs(got.scores - d @ q).max() <= 1e-5


def test_score_encodes_as_encode_does_with_the_profile_and_options(folders, tmp_path) -> None:
    """A profile's (or the request's) templates, default_instruction, pooling and normalize
    shape an embedder's score as they shape its encode: the scores are the dot products of
    sentence-transformers' vectors of the templated texts under that pooling; the request's
    options win over the profile's."""
    from reference import st_encode as st_vectors

    folder, docs = folders["qwen3-embedding"], DOCS[:6]
    task = {"pooling": "mean", "default_instruction": "find it", "doc_template": "Doc: {text}",
            "query_template": "Task: {instruction} Query: {text}"}
    catalog = tmp_path / "score_catalog.json"
    catalog.write_text(json.dumps({"models": {"emb": {
        "family": "decoder-embedder", "source": str(folder), "profiles": {"task": task}}}}))
    eng = Engine(Settings(dtype="float32", catalog_files=[catalog], default_models=[],
                          device="cpu"))
    try:
        by_profile = eng.score("emb:task", QUERIES[0], docs).scores
        by_options = eng.score("emb", QUERIES[0], docs, task).scores
        last = eng.score("emb:task", QUERIES[0], docs, {"pooling": "last_token"}).scores
        raw = eng.score("emb", QUERIES[0], docs, {"normalize": False}).scores
        with pytest.raises(InvalidRequest, match="options.pooling must be one of"):
            eng.score("emb", QUERIES[0], docs, {"pooling": "max"})
    finally:
        eng.close()
    q = st_vectors(folder, ["Task: find it Query: " + QUERIES[0]], pooling="mean")[0]
    d = st_vectors(folder, ["Doc: " + t for t in docs], pooling="mean")
    assert np.abs(by_profile - d @ q).max() <= 1e-5
    assert np.abs(by_options - by_profile).max() <= 1e-6
    q = st_vectors(folder, ["Task: find it Query: " + QUERIES[0]], pooling="lasttoken")[0]
    d = st_vectors(folder, ["Doc: " + t for t in docs], pooling="lasttoken")
    assert np.abs(last - d @ q).max() <= 1e-5
    q = st_vectors(folder, [QWEN3_QUERY + QUERIES[0]], normalize=False)[0]
    d = st_vectors(folder, docs, normalize=False)
    assert np.abs(raw - d @ q).max() <= 1e-4 * np.abs(d @ q).max()


def test_packed_mixed_lengths_equal_texts_alone(engine, folders) -> None:
    batch = engine.encode("qwen3-embedding", SHORT_TEXTS + LONG_TEXTS[:2])
    for i in range(0, len(SHORT_TEXTS) + 2, 5):
        text = (SHORT_TEXTS + LONG_TEXTS[:2])[i]
        alone = engine.encode("qwen3-embedding", [text])[0]
        assert float(alone.dense @ batch[i].dense) >= 0.99999, f"text {i}"


@pytest.mark.parametrize("variant", ["qwen3-embedding-sharded", "qwen2-embedding",
                                     "mistral-embedding", "llama-mean"])
def test_other_layouts_and_architectures(engine, folders, variant) -> None:
    """Sharded index; Qwen2 (q/k/v biases, untied); Mistral (BOS+EOS template); Llama (linear
    rope scaling, mean pooling)."""
    texts = SHORT_TEXTS + LONG_TEXTS[:1]
    assert_cosines(engine.encode(variant, texts), st_encode(folders[variant], texts), variant)


def test_sharded_index_is_what_loads(folders, tmp_path) -> None:
    """A stale shard the index does not name is ignored (the index decides)."""
    import shutil

    from safetensors.torch import save_file
    from sie_server.runtime.weights import load_state_dict

    folder = tmp_path / "m"
    shutil.copytree(folders["qwen3-embedding-sharded"], folder)
    save_file({"junk": torch.zeros(1)}, str(folder / "model-stale.safetensors"))
    assert "junk" not in load_state_dict(folder)


# ------------------------------------------------------------------ LLM reranker

def reference_scores(folder: Path, query: str, docs: list[str], instruction: str | None,
                     max_length: int) -> np.ndarray:
    """The Qwen3-Reranker model card's code (left padding, yes/no at the last position)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    prefix = tok.encode(PREFIX, add_special_tokens=False)
    suffix = tok.encode(SUFFIX, add_special_tokens=False)
    task = instruction or DEFAULT_INSTRUCTION
    pairs = [f"<Instruct>: {task}\n<Query>: {query}\n<Document>: {d}" for d in docs]
    inputs = tok(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                 max_length=max_length - len(prefix) - len(suffix))
    inputs["input_ids"] = [prefix + ids + suffix for ids in inputs["input_ids"]]
    inputs = tok.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1, :]
    no, yes = tok.convert_tokens_to_ids("no"), tok.convert_tokens_to_ids("yes")
    pair = torch.stack([logits[:, no], logits[:, yes]], dim=1)
    return torch.log_softmax(pair, dim=1)[:, 1].exp().numpy()


@pytest.fixture(scope="module")
def rr_engine(folders):
    catalog = {v: {"family": "llm-reranker", "source": str(folders[v]),
                   "max_input_tokens": RR_MAX}
               for v in ("qwen3-reranker", "qwen3-reranker-untied")}
    path = folders["qwen3-reranker"].parent / "rr_catalog.json"
    path.write_text(json.dumps({"models": catalog}))  # YAML is a superset of JSON
    eng = Engine(Settings(dtype="float32", catalog_files=[path], default_models=[], device="cpu"))
    yield eng
    eng.close()


@pytest.mark.parametrize("variant", ["qwen3-reranker", "qwen3-reranker-untied"])
def test_reranker_equals_model_card_formula(rr_engine, folders, variant) -> None:
    for query in QUERIES:
        got = rr_engine.score(variant, query, DOCS)
        want = reference_scores(folders[variant], query, DOCS, None, RR_MAX)
        assert np.abs(got.scores - want).max() <= 1e-4, query
        assert got.order.tolist() == np.argsort(-want, kind="stable").tolist()
        assert got.activation == "sigmoid"
    # activation none: the raw log-odds, logit("yes") - logit("no")
    raw = rr_engine.score(variant, QUERIES[0], DOCS, {"activation": "none"}).scores
    want = reference_scores(folders[variant], QUERIES[0], DOCS, None, RR_MAX)
    assert np.abs(raw - (np.log(want) - np.log1p(-want))).max() <= 1e-3


def test_reranker_instruction_and_concurrent_batches(rr_engine, folders) -> None:
    instruction = "Judge whether the passage is in the same language as the query"
    futures = [rr_engine.submit_score("qwen3-reranker", q, DOCS, {"instruction": instruction})
               for q in QUERIES]
    for q, f in zip(QUERIES, futures):
        want = reference_scores(folders["qwen3-reranker"], q, DOCS, instruction, RR_MAX)
        assert np.abs(f.result().scores - want).max() <= 1e-4, q


def test_reranker_refusals(rr_engine) -> None:
    with pytest.raises(InputTooLong, match="query.text"):
        rr_engine.score("qwen3-reranker", " ".join(["word"] * 400), ["doc"])
    with pytest.raises(InputTooLong, match=r"items\[0\]"):
        rr_engine.score("qwen3-reranker", "q", [LONG_TEXTS[0]], {"truncate": False})
    with pytest.raises(InvalidRequest, match="/v1/score"):
        rr_engine.encode("qwen3-reranker", ["text"])


# ------------------------------------------------------------------ over HTTP

def test_http_embeddings_dimensions_and_score(start_server, folders) -> None:
    """A real server: /v1/embeddings with `dimensions` (matryoshka entry) and /v1/score."""
    catalog = folders["qwen3-embedding"].parent / "http_catalog.json"
    catalog.write_text(json.dumps({"models": {
        "emb": {"family": "decoder-embedder", "source": str(folders["qwen3-embedding"]),
                "matryoshka": True, "matryoshka_min_dims": 32},
        "rr": {"family": "llm-reranker", "source": str(folders["qwen3-reranker"]),
               "max_input_tokens": RR_MAX}}}))
    server = start_server(["--catalog", str(catalog), "--default-model", "emb",
                           "--default-model", "rr"])
    texts = SHORT_TEXTS[:6]
    r = httpx.post(f"{server.url}/v1/embeddings",
                   json={"model": "emb", "input": texts, "dimensions": 32}, timeout=60)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    full = st_encode(folders["qwen3-embedding"], texts)[:, :32]
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    assert got.shape == (6, 32) and ((got * full).sum(1) >= 0.99999).all()
    r = httpx.post(f"{server.url}/v1/embeddings",
                   json={"model": "emb", "input": texts, "dimensions": 16}, timeout=60)
    assert r.status_code == 400 and "at least 32" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{server.url}/v1/score/rr",
                   json={"query": {"text": QUERIES[0]}, "items": [{"text": d} for d in DOCS]},
                   timeout=60)
    assert r.status_code == 200, r.text
    want = reference_scores(folders["qwen3-reranker"], QUERIES[0], DOCS, None, RR_MAX)
    scores = {s["item_id"]: s["score"] for s in r.json()["scores"]}
    assert max(abs(scores[f"item-{i}"] - want[i]) for i in range(len(DOCS))) <= 1e-4


@pytest.mark.parametrize("variant", makers.VARIANTS)
def test_test_models_are_complete_hub_checkpoints(folders, variant) -> None:
    """transformers loads every folder with no missing or unexpected weights (it would fill
    missing ones randomly, which would make the parity tests meaningless)."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if "reranker" in variant else AutoModel
    _, info = cls.from_pretrained(str(folders[variant]), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


# ------------------------------------------------------------------ LoRA

def test_lora_on_decoder_linears_equals_peft_merged(folders, tmp_path) -> None:
    """A PEFT adapter on q/k/v/o/gate/up/down of the Qwen3 embedder equals peft's merged model
    (last token, normalised); base rows in the same batch stay the base model's."""
    from lora_adapters import make_adapter

    base = folders["qwen3-embedding"]
    made = make_adapter(base, tmp_path / "org" / "qwen-lora", r=4, seed=5,
                        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj"])
    eng = Engine(Settings(dtype="float32", models={"q": str(base)}, default_models=[], device="cpu",
                          adapter_roots=[tmp_path]))
    try:
        texts = SHORT_TEXTS[:12]
        tuned = eng.submit("q", texts, options={"lora_id": "org/qwen-lora"})
        plain = eng.submit("q", texts)
        tuned, plain = tuned.result(), plain.result()
    finally:
        eng.close()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    with torch.no_grad():
        ref = []
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            h = made["merged"](input_ids=ids).last_hidden_state[0, -1]
            ref.append(torch.nn.functional.normalize(h, dim=-1).numpy())
    assert_cosines(tuned, np.stack(ref), "lora")
    assert_cosines(plain, st_encode(base, texts), "base rows")
    assert min(float(a.dense @ b.dense) for a, b in zip(tuned, plain)) < 0.999  # it did change


@pytest.mark.parametrize("tokenizer_from", ["qwen3-embedding", "qwen3-reranker"])
def test_truncation_equals_sentence_transformers(folders, tmp_path, tokenizer_from) -> None:
    """Over-long texts cut as Hugging Face cuts them: with an EOS-appending tokenizer the EOS
    stays last; with a Qwen base tokenizer (no post-processor tokens) the text just ends."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(folders["qwen3-embedding"], folder)
    shutil.copy(folders[tokenizer_from] / "tokenizer.json", folder / "tokenizer.json")
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24}))
    eng = Engine(Settings(dtype="float32", models={"m": str(folder)}, default_models=[], device="cpu"))
    try:
        texts = SHORT_TEXTS[:30]
        ours = eng.encode("m", texts)
    finally:
        eng.close()
    assert any(r.truncated for r in ours) and all(r.token_count <= 24 for r in ours)
    assert_cosines(ours, st_encode(folder, texts), f"truncated, tokenizer of {tokenizer_from}")


def test_add_eos_token_of_tokenizer_config(folders, tmp_path) -> None:
    """gte-Qwen2's tokenizer class appends EOS when tokenizer_config.json says add_eos_token
    (tokenizer.json does not): as its model card computes it, Qwen2Model on text + EOS, last
    token, normalised."""
    import shutil

    from transformers import AutoModel, AutoTokenizer

    folder = tmp_path / "gte"
    shutil.copytree(folders["qwen2-embedding"], folder)
    shutil.copy(folders["qwen3-reranker"] / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_eos_token": True}))
    texts = SHORT_TEXTS[:15]
    eng = Engine(Settings(dtype="float32", models={"m": str(folder)}, default_models=[], device="cpu"))
    try:
        ours = eng.encode("m", texts)
    finally:
        eng.close()
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    ref = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"] + [tok.eos_token_id]
            h = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            ref.append(torch.nn.functional.normalize(h, dim=-1).numpy())
    assert_cosines(ours, np.stack(ref), "add_eos_token")
    assert ours[0].token_count == len(tok(texts[0])["input_ids"]) + 1


def test_prompt_config_and_unsupported_configs(folders, tmp_path) -> None:
    """read_prompts: `query`, then `document` / `passage`, else default_prompt_name's prompt;
    unsupported decoder configs are refused at load with the reason."""
    import shutil

    from sie_server.models.decoder_embedder import read_prompts
    from sie_server.runtime.decoder import DecoderConfig

    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "q: ", "passage": "p: "}, "default_prompt_name": None}))
    assert read_prompts(tmp_path) == ("q: ", "p: ")
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"web": "Instruct: web\nQuery: "}, "default_prompt_name": "web"}))
    assert read_prompts(tmp_path) == ("Instruct: web\nQuery: ",) * 2
    folder = tmp_path / "m"
    shutil.copytree(folders["llama-mean"], folder)
    config = json.loads((folder / "config.json").read_text())
    for bad, why in (({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
                     ({"model_type": "gemma"}, "gemma"), ({"hidden_act": "gelu"}, "gelu")):
        (folder / "config.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(ValueError, match=why):
            DecoderConfig.from_folder(folder)
