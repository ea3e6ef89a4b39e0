"""The engine equals the reference implementations on the same weights (CPU, fp32, set
explicitly: `--dtype auto` is bf16 on CPUs that compute it natively).

Tolerances (issue 2): BGE-M3 dense cosine >= 0.99999; multivector same token count and
max abs diff <= 1e-4; sparse the same token-id set and weights within 1e-4.
sentence-transformers dense models (all-MiniLM-L6-v2, an XLM-R model): cosine >= 0.9999.
TEXTS include the literal text of XLM-R's special tokens (issue 12): transformers' RoBERTa
family numbers positions from the ids, so a typed `<pad>` keeps the padding position; BERT
texts get `[CLS]` `[SEP]` `[PAD]` `[UNK]` `[MASK]` typed in.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import reference
import torch
from conftest import held_worker
from hypothesis import given, settings
from hypothesis import strategies as st
from texts import (BERT_SPECIAL_TOKEN_TEXTS, OVER_LIMIT_TEXTS, SHORT_TEXTS, SPECIAL_TOKEN_TEXTS,
                   TEXTS)

from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.errors import InvalidRequest
from sie_server.runtime.batch import pack, positions

ALL = ["dense", "sparse", "multivector"]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def engine(bge_m3_dir: Path):
    eng = Engine(Settings(models={"BAAI/bge-m3": str(bge_m3_dir)}, default_models=[],
                          device="cpu", dtype="float32"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def flag_outputs(bge_m3_dir: Path) -> list[dict]:
    return reference.flag_encode(bge_m3_dir, TEXTS, max_length=8192)


def assert_matches_flag(ours, ref: dict, label: str) -> None:
    cos = float(ours.dense @ ref["dense"]) / float(np.linalg.norm(ours.dense) * np.linalg.norm(ref["dense"]))
    assert cos >= 0.99999, f"{label}: dense cosine {cos}"
    assert ours.multivector.shape == ref["multivector"].shape, label
    mv_diff = float(np.abs(ours.multivector - ref["multivector"]).max())
    assert mv_diff <= 1e-4, f"{label}: multivector max abs diff {mv_diff}"
    idx, val = ours.sparse
    assert idx.dtype == np.int32 and val.dtype == np.float32
    assert set(idx.tolist()) == set(ref["sparse"]), f"{label}: sparse token ids differ"
    ref_vals = np.array([ref["sparse"][i] for i in idx.tolist()], dtype=np.float32)
    sp_diff = float(np.abs(val - ref_vals).max()) if len(val) else 0.0
    assert sp_diff <= 1e-4, f"{label}: sparse weight diff {sp_diff}"


def test_texts_cover_the_required_range() -> None:
    assert len(TEXTS) >= 50
    assert len(OVER_LIMIT_TEXTS) >= 1


def test_bge_m3_equals_flagembedding(engine: Engine, flag_outputs: list[dict],
                                     bge_m3_dir: Path) -> None:
    ours = engine.encode("BAAI/bge-m3", TEXTS, ALL)
    ref_ids = reference.flag_token_ids(bge_m3_dir, TEXTS)
    for i, (r, ref) in enumerate(zip(ours, flag_outputs)):
        assert r.token_count == len(ref_ids[i]), f"text {i}: token count"
        assert_matches_flag(r, ref, f"text {i} ({TEXTS[i][:30]!r})")


def test_over_limit_input_is_truncated_and_reported(engine: Engine) -> None:
    results = engine.encode("BAAI/bge-m3", OVER_LIMIT_TEXTS, ["dense"])
    for r in results:
        assert r.truncated and r.token_count == 8192


def test_batching_does_not_change_results(engine: Engine, flag_outputs: list[dict]) -> None:
    """Each text alone equals the same text inside a batch of mixed lengths (and the reference)."""
    for i in range(0, len(SHORT_TEXTS) + len(SPECIAL_TOKEN_TEXTS), 7):
        alone = engine.encode("BAAI/bge-m3", [TEXTS[i]], ALL)[0]
        assert_matches_flag(alone, flag_outputs[i], f"text {i} alone")


def test_concurrent_requests_share_batches_and_keep_their_results(engine: Engine,
                                                                  flag_outputs) -> None:
    """Many requests in flight at once are batched together; each gets its own vectors."""
    futures = [(i, engine.submit("BAAI/bge-m3", [TEXTS[i], TEXTS[-1 - i]], ALL))
               for i in range(20)]
    for i, fut in futures:
        first, last = fut.result(timeout=120)
        assert_matches_flag(first, flag_outputs[i], f"text {i} concurrent")
        assert_matches_flag(last, flag_outputs[len(TEXTS) - 1 - i], f"text -{i} concurrent")


def test_output_subsets_come_from_one_forward(engine: Engine, flag_outputs) -> None:
    only_sparse = engine.encode("BAAI/bge-m3", TEXTS[:3], ["sparse"])
    for r, ref in zip(only_sparse, flag_outputs):
        assert r.dense is None and r.multivector is None
        assert set(r.sparse[0].tolist()) == set(ref["sparse"])


def test_normalize_false_equals_flagembedding_unnormalised(engine: Engine, bge_m3_dir: Path,
                                                           flag_outputs) -> None:
    """SIE's `normalize: false` = FlagEmbedding's normalize_embeddings=False (dense and colbert
    vectors as computed), in the same batches as normalised requests, which keep theirs.
    Tolerances: dense cosine >= 0.99999 and norm within 1e-4 relative; multivector max abs
    diff <= 1e-4 x the largest value."""
    texts = TEXTS[:16]
    ref = reference.flag_encode(bge_m3_dir, texts, max_length=8192, normalize=False)
    with held_worker(engine, "BAAI/bge-m3") as (_, release, batches):
        futures = [(engine.submit("BAAI/bge-m3", [t], ALL, {"normalize": False} if i % 2 else {}),
                    i) for i, t in enumerate(texts)]
        release()
    assert any(len({e[0].raw for e in b}) == 2 for b in batches[1:]), "no mixed batch"
    norms = []
    for fut, i in futures:
        r = fut.result(timeout=120)[0]
        if i % 2 == 0:
            assert_matches_flag(r, flag_outputs[i], f"text {i} beside unnormalised rows")
            continue
        want = ref[i]
        norms.append(float(np.linalg.norm(r.dense)))
        assert abs(norms[-1] / np.linalg.norm(want["dense"]) - 1) <= 1e-4, f"text {i}"
        cos = float(r.dense @ want["dense"]) / (norms[-1] * float(np.linalg.norm(want["dense"])))
        assert cos >= 0.99999, f"text {i}: dense cosine {cos}"
        assert r.multivector.shape == want["multivector"].shape
        scale = float(np.abs(want["multivector"]).max())
        assert float(np.abs(r.multivector - want["multivector"]).max()) <= 1e-4 * scale
        assert set(r.sparse[0].tolist()) == set(want["sparse"]), f"text {i}: sparse ids"
    assert min(abs(n - 1) for n in norms) > 0.01  # the reference's vectors are not unit length


def assert_st_close(ours: np.ndarray, ref: np.ndarray, texts: list[str]) -> None:
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    i = int(cos.argmin())
    assert cos.min() >= 0.9999, f"worst cosine {cos.min()} at text {i} ({texts[i][:40]!r})"


def test_minilm_equals_sentence_transformers(minilm_dir: Path) -> None:
    texts = TEXTS + BERT_SPECIAL_TOKEN_TEXTS
    eng = Engine(Settings(default_models=[], device="cpu", dtype="float32"))
    try:
        ours = np.stack([r.dense for r in eng.encode(MINILM, texts)])
    finally:
        eng.close()
    assert_st_close(ours, reference.st_encode(minilm_dir, texts), texts)


def test_sie_templates_on_minilm_equal_sentence_transformers_on_the_formatted_texts(
        minilm_dir: Path, engine: Engine) -> None:
    """SIE's per-request `doc_template` / `query_template` (SIE's sentence-transformers and
    flash adapters: `template.format(text=..., instruction=...)`, replacing prompts) against
    sentence-transformers on the texts so formatted (cosine >= 0.9999); BGE-M3 ignores them,
    as SIE's BGE-M3 adapters do; a placeholder other than {text} / {instruction} is a 400
    naming the option."""
    texts = TEXTS[:10]
    eng = Engine(Settings(default_models=[], device="cpu", dtype="float32"))
    try:
        docs = eng.encode(MINILM, texts, options={"doc_template": "passage: {text}",
                                                  "query_template": "unused {text}"})
        empty = eng.encode(MINILM, texts[:2], options={"doc_template": ""})  # SIE: no template
        plain = eng.encode(MINILM, texts[:2])
        queries = eng.encode(MINILM, texts, options={
            "is_query": True, "instruction": "Find it", "query_template": "{instruction}: {text}"})
        with pytest.raises(InvalidRequest, match=r"params\.options\.doc_template .*nope"):
            eng.encode(MINILM, texts[:1], options={"doc_template": "{nope} {text}"})
    finally:
        eng.close()
    assert all(np.array_equal(a.dense, b.dense) for a, b in zip(empty, plain))
    for ours, formatted in ((docs, [f"passage: {t}" for t in texts]),
                            (queries, [f"Find it: {t}" for t in texts])):
        assert_st_close(np.stack([r.dense for r in ours]),
                        reference.st_encode(minilm_dir, formatted), formatted)
    plain = engine.encode("BAAI/bge-m3", texts[:3], ["dense"])
    templated = engine.encode("BAAI/bge-m3", texts[:3], ["dense"],
                              {"doc_template": "passage: {text}"})
    for a, b in zip(plain, templated):
        assert a.token_count == b.token_count and np.array_equal(a.dense, b.dense)


def test_minilm_normalize_false_equals_its_pipeline_without_normalize(minilm_dir: Path) -> None:
    """`normalize: false` on a sentence-transformers model whose last module is Normalize:
    the mean-pooled vectors, as sentence-transformers gives them without that module (and
    TEI's `normalize: false`); cosine >= 0.9999 and norms within 1e-4 relative."""
    texts = TEXTS[:20]
    eng = Engine(Settings(default_models=[], device="cpu", dtype="float32"))
    try:
        ours = np.stack([r.dense for r in eng.encode(MINILM, texts, options={"normalize": False})])
    finally:
        eng.close()
    ref = reference.st_encode(minilm_dir, texts, normalize=False)
    assert_st_close(ours, ref, texts)
    ratio = np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.abs(ratio - 1).max() <= 1e-4
    assert np.abs(np.linalg.norm(ref, axis=1) - 1).min() > 0.01


def test_minilm_request_pooling_equals_sentence_transformers_pooling_so(minilm_dir: Path
                                                                         ) -> None:
    """SIE's per-request `pooling` on a sentence-transformers model: `cls` and `last` rows
    as sentence-transformers computes them with a Pooling module of that mode (cosine >=
    0.9999), in the same batches as rows pooled the model's way (mean), which keep theirs.
    `default_instruction` gives a query the instruction it names (and a document none)."""
    texts = TEXTS[:18]
    modes = [None, "cls", "last"]
    eng = Engine(Settings(default_models=[], device="cpu", dtype="float32"))
    try:
        with held_worker(eng, MINILM) as (_, release, batches):
            futures = [eng.submit(MINILM, [t], options={"pooling": modes[i % 3]} if i % 3
                                  else None) for i, t in enumerate(texts)]
            release()
        got = [f.result(timeout=120)[0].dense for f in futures]
        told = {kind: eng.encode(MINILM, ["what is a packed batch"], options={
            "is_query": kind == "query", **extra})[0].dense
            for kind, extra in (("query", {"default_instruction": "Represent the question"}),
                                ("query_asked", {"instruction": "Represent the question"}),
                                ("doc", {"default_instruction": "Represent the question"}),
                                ("plain", {}))}
    finally:
        eng.close()
    assert any(len({e[0].pooling for e in b}) == 3 for b in batches[1:]), "no mixed batch"
    for i, mode in enumerate(modes):
        rows = list(range(i, len(texts), 3))
        want = reference.st_encode(minilm_dir, [texts[r] for r in rows],
                                   pooling={"cls": "cls", "last": "lasttoken"}.get(mode, "mean"))
        assert_st_close(np.stack([got[r] for r in rows]), want, [texts[r] for r in rows])
    assert np.abs(told["query"] - told["query_asked"]).max() <= 1e-6
    assert np.abs(told["doc"] - told["plain"]).max() <= 1e-6
    assert np.abs(told["query"] - told["plain"]).max() > 1e-2


def test_minilm_profiles_pool_and_instruct_as_the_options_do(minilm_dir: Path,
                                                             tmp_path: Path) -> None:
    """A catalog profile's `pooling` and `default_instruction` (SIE's runtime options) give
    what the request options give; the request's own win."""
    import yaml

    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": {"st/minilm": {
        "family": "sentence-transformers", "source": str(minilm_dir), "profiles": {
            "cls": {"pooling": "cls"},
            "asks": {"is_query": True, "default_instruction": "Represent the question"}}}}}))
    eng = Engine(Settings(catalog_files=[catalog], default_models=[], device="cpu",
                          dtype="float32"))
    texts = TEXTS[:4]
    try:
        def dense(model: str, options: dict | None = None) -> np.ndarray:
            return np.stack([r.dense for r in eng.encode(model, texts, options=options)])

        by_profile, by_option = dense("st/minilm:cls"), dense("st/minilm", {"pooling": "cls"})
        overridden = dense("st/minilm:cls", {"pooling": "mean"})
        plain = dense("st/minilm")
        asked = dense("st/minilm:asks")
        by_hand = dense("st/minilm", {"is_query": True, "instruction": "Represent the question"})
        own = dense("st/minilm:asks", {"instruction": ""})
        bare_query = dense("st/minilm", {"is_query": True})
    finally:
        eng.close()
    assert np.abs(by_profile - by_option).max() <= 1e-6
    assert np.abs(overridden - plain).max() <= 1e-6 and np.abs(by_profile - plain).max() > 1e-2
    assert np.abs(asked - by_hand).max() <= 1e-6 and np.abs(asked - plain).max() > 1e-2
    assert np.abs(own - bare_query).max() <= 1e-6  # the request's "" instruction wins


def test_pooling_a_model_cannot_change_is_400(engine: Engine) -> None:
    """BGE-M3 pools by its CLS token only: `pooling: cls` is served, `mean` and a name SIE
    does not use are 400s naming the option (SIE's BGE-M3 adapter ignores the option)."""
    assert engine.encode("BAAI/bge-m3", ["a"], options={"pooling": "cls"})[0].dense is not None
    with pytest.raises(InvalidRequest, match="params.options.pooling 'mean': BAAI/bge-m3 pools "
                                             "by cls"):
        engine.encode("BAAI/bge-m3", ["a"], options={"pooling": "mean"})
    with pytest.raises(InvalidRequest, match="params.options.pooling must be one of cls, mean, "
                                             "last"):
        engine.encode("BAAI/bge-m3", ["a"], options={"pooling": "max"})


# ---------------------------------------------------------------- positions (issue 12)

def test_special_token_texts_put_special_ids_everywhere(bge_m3_dir: Path) -> None:
    """The special-token texts really hold a typed <pad> (id 1) before the end, where
    transformers' positions and 0..n-1 differ, and every special id at start / middle / end."""
    from transformers.models.xlm_roberta.modeling_xlm_roberta import \
        create_position_ids_from_input_ids

    ids = reference.flag_token_ids(bge_m3_dir, SPECIAL_TOKEN_TEXTS)
    inner = [set(x[1:-1]) for x in ids]
    for special in (0, 1, 2, 3, 250001):
        assert any(x[1] == special for x in ids), special  # right after <s>
        assert any(x[-2] == special for x in ids), special  # right before </s>
        assert sum(special in s for s in inner) >= 4, special
    differ = [x for x in ids if (create_position_ids_from_input_ids(torch.tensor([x]), 1)[0]
                                 != torch.arange(len(x)) + 2).any()]
    assert len(differ) >= 6


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0, 1, 2, 3, 5, 17, 250001]), min_size=1, max_size=12),
                min_size=1, max_size=6))
def test_packed_positions_equal_transformers(seqs: list[list[int]]) -> None:
    """Any ids, packed: RoBERTa/XLM-R positions as create_position_ids_from_input_ids gives
    them per sequence (pad id 1), BERT's 0..n-1 whatever the ids."""
    from transformers.models.xlm_roberta.modeling_xlm_roberta import \
        create_position_ids_from_input_ids

    batch = pack([np.array(x, dtype=np.int64) for x in seqs], frozenset())
    want = np.concatenate([create_position_ids_from_input_ids(torch.tensor([x]), 1)[0].numpy()
                           for x in seqs])
    got = positions(batch.cu_seqlens, 2, batch.input_ids, pad_id=1)
    np.testing.assert_array_equal(got, want)
    bert = np.concatenate([np.arange(len(x)) for x in seqs])
    np.testing.assert_array_equal(positions(batch.cu_seqlens, 0, batch.input_ids), bert)


def test_packed_attention_equals_sdpa_per_sequence() -> None:
    """CPU attention on a packed batch, q, k, v strided views of one fused QKV as the encoder
    passes them, equals SDPA on each sequence alone (atol 1e-6), whichever way a group is
    formed: one run of the batch, read in place (one sequence; adjacent sequences of one
    length), gathered (one length, apart), or padded (slack 1.25)."""
    import torch.nn.functional as F

    from sie_server.runtime.attention import BucketedAttention

    lengths = [7, 7, 3, 7, 12, 12, 1, 5]
    cu = np.r_[0, np.cumsum(lengths)]
    qkv = torch.randn(int(cu[-1]), 3, 4, 16, generator=torch.Generator().manual_seed(0))
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    for slack in (None, 1.25):
        att = BucketedAttention(cu, torch.device("cpu"), slack=slack)
        in_place = [g[2] for g in att.groups if isinstance(g[0], slice)]
        if slack is None:
            assert sorted(in_place) == [1, 1, 1, 2] and len(att.groups) == 5, att.groups
        got = att(q, k, v)
        for s, e in zip(cu[:-1], cu[1:]):
            ref = F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)))
            torch.testing.assert_close(got[s:e], ref.transpose(0, 1), atol=1e-6, rtol=0)


def test_sparse_drops_special_ids_typed_or_not(engine: Engine, flag_outputs: list[dict]) -> None:
    """FlagEmbedding drops <s> <pad> </s> <unk> (0 1 2 3) from lexical weights wherever they
    come from (added by the tokenizer or typed in the text) and keeps <mask> (250001)."""
    first = TEXTS.index(SPECIAL_TOKEN_TEXTS[0])
    ours = engine.encode("BAAI/bge-m3", SPECIAL_TOKEN_TEXTS, ["sparse"])
    masks = 0
    for i, (r, ref) in enumerate(zip(ours, flag_outputs[first:])):
        got = set(r.sparse[0].tolist())
        assert got == set(ref["sparse"]), SPECIAL_TOKEN_TEXTS[i]
        assert not got & {0, 1, 2, 3}
        masks += 250001 in got
    assert masks > 0  # a typed <mask> is a weighted term, as in FlagEmbedding


@pytest.fixture(scope="module")
def xlmr_st_dir(bge_m3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentence-transformers XLM-R model (mean pooling, Normalize) on the BGE-M3-shaped
    test model's encoder weights and real XLM-R tokenizer."""
    out = tmp_path_factory.mktemp("xlmr-st")
    for f in bge_m3_dir.iterdir():
        if f.is_file() and f.suffix != ".pt":
            shutil.copy(f, out / f.name)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512,
                                                               "do_lower_case": False}))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}))
    (out / "2_Normalize").mkdir()
    return out


def test_xlmr_sentence_transformer_equals_sentence_transformers(xlmr_st_dir: Path) -> None:
    texts = SHORT_TEXTS + SPECIAL_TOKEN_TEXTS
    eng = Engine(Settings(models={"xlmr-st": str(xlmr_st_dir)}, default_models=[], device="cpu",
                          dtype="float32"))
    try:
        assert eng.registry.get("xlmr-st").spec.family == "sentence-transformers"
        ours = np.stack([r.dense for r in eng.encode("xlmr-st", texts)])
    finally:
        eng.close()
    assert_st_close(ours, reference.st_encode(xlmr_st_dir, texts), texts)


def test_lora_adapter_on_special_token_texts(bge_m3_dir: Path, legal_lora: dict) -> None:
    """The issue saw typed special tokens go wrong with a LoRA adapter too: its outputs equal
    peft's merged model (FlagEmbedding's way, tests/lora_adapters.py) at the LoRA tolerances."""
    from conftest import LEGAL_LORA
    from lora_adapters import assert_m3_close, m3_reference

    heads = {h: torch.load(bge_m3_dir / f"{h}.pt", weights_only=True)
             for h in ("colbert_linear", "sparse_linear")}
    ids = reference.flag_token_ids(bge_m3_dir, SPECIAL_TOKEN_TEXTS)
    want = m3_reference(legal_lora["merged"], heads, ids)
    eng = Engine(Settings(models={"BAAI/bge-m3": str(bge_m3_dir)}, default_models=[],
                          device="cpu", dtype="float32", adapter_roots=[legal_lora["root"]]))
    try:
        got = eng.encode("BAAI/bge-m3", SPECIAL_TOKEN_TEXTS, ALL, {"lora_id": LEGAL_LORA})
    finally:
        eng.close()
    for text, g, w in zip(SPECIAL_TOKEN_TEXTS, got, want):
        assert_m3_close(g, w, text)
