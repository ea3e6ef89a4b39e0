"""The test assets and reference oracles work: the BGE-M3-shaped test model builds and loads,
FlagEmbedding gives non-degenerate outputs with the documented semantics, and
sentence-transformers runs the real all-MiniLM-L6-v2."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import reference as R  # tests/ and scripts/ are put on sys.path by conftest.py
from texts import EDGE_TEXTS, LONG_TEXTS, OVER_LIMIT_TEXTS, SHORT_TEXTS, SPECIAL_TOKEN_TEXTS, TEXTS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_bge_m3_test_model.py"
SAMPLE = [
    "Paris is the capital and most populous city of France.",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "🎉🎉🎉 Congrats!!! 🥳🍾 You did it 💯🔥🔥",
]


def _builder():
    spec = importlib.util.spec_from_file_location("make_bge_m3_test_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def m3_dir(bge_m3_dir: Path) -> Path:
    """conftest's session-wide build of scripts/make_bge_m3_test_model.py."""
    return bge_m3_dir


def test_texts_cover_the_cases() -> None:
    assert len(TEXTS) >= 60 and len(set(TEXTS)) == len(TEXTS)
    assert TEXTS == SHORT_TEXTS + SPECIAL_TOKEN_TEXTS + LONG_TEXTS
    assert OVER_LIMIT_TEXTS == LONG_TEXTS[-2:]
    assert len(R.miracl_passages()) == 360 and len(EDGE_TEXTS) == 4


def test_model_folder(m3_dir: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "colbert_linear.pt", "sparse_linear.pt"):
        assert (m3_dir / name).is_file(), name
    cfg = AutoConfig.from_pretrained(m3_dir)
    assert cfg.model_type == "xlm-roberta" and cfg.vocab_size == 250002
    assert cfg.max_position_embeddings == 8194 and cfg.pad_token_id == 1
    tok = AutoTokenizer.from_pretrained(m3_dir)
    assert type(tok).__name__ == "XLMRobertaTokenizerFast" and tok.model_max_length == 8192
    assert tok("Hello world!")["input_ids"] == [0, 35378, 8999, 38, 2]
    # the `tokenizers` library alone (what an engine would use) agrees with transformers,
    # truncation included (max_length counts <s> and </s>)
    raw = Tokenizer.from_file(str(m3_dir / "tokenizer.json"))
    raw.enable_truncation(max_length=8192)
    assert [e.ids for e in raw.encode_batch(TEXTS + EDGE_TEXTS)] == \
        R.flag_token_ids(m3_dir, TEXTS + EDGE_TEXTS)


def test_build_is_deterministic(m3_dir: Path, tmp_path: Path) -> None:
    import torch

    mk = _builder()
    assert mk.digest(m3_dir) == mk.SEED0_DIGEST  # same weights as everywhere else
    other = mk.build(tmp_path / "again")
    assert (other / "model.safetensors").read_bytes() == (m3_dir / "model.safetensors").read_bytes()
    for head in ("colbert_linear.pt", "sparse_linear.pt"):
        a, b = torch.load(m3_dir / head), torch.load(other / head)
        assert set(a) == {"weight", "bias"} and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((other / "config.json").read_text()) == \
        json.loads((m3_dir / "config.json").read_text())
    assert mk.digest(mk.build(tmp_path / "seed1", seed=1)) != mk.SEED0_DIGEST


def test_flag_encode_non_degenerate(m3_dir: Path) -> None:
    out = R.flag_encode(m3_dir, SAMPLE)
    ids = R.flag_token_ids(m3_dir, SAMPLE)
    dense = np.stack([o["dense"] for o in out])
    assert dense.shape == (len(SAMPLE), 64) and dense.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(dense, axis=1), 1.0, atol=1e-5)
    cos = dense @ dense.T
    assert cos[~np.eye(len(SAMPLE), dtype=bool)].max() < 0.99  # texts are told apart
    for o, tid in zip(out, ids):
        mv = o["multivector"]
        assert mv.shape == (len(tid) - 1, 64)  # CLS dropped, </s> kept
        np.testing.assert_allclose(np.linalg.norm(mv, axis=1), 1.0, atol=1e-5)
        sp = o["sparse"]
        assert sp and all(isinstance(k, int) for k in sp)
        assert set(sp) <= set(tid) - {0, 1, 2, 3} and min(sp.values()) > 0
    # a healthy mix: some ids of the sample get weight 0 (dropped)
    assert sum(len(o["sparse"]) for o in out) < sum(len(set(t) - {0, 1, 2, 3}) for t in ids)


def test_flag_truncates_at_8192(m3_dir: Path) -> None:
    ids = R.flag_token_ids(m3_dir, OVER_LIMIT_TEXTS[:1])[0]
    assert len(ids) == 8192 and ids[0] == 0 and ids[-1] == 2
    (o,) = R.flag_encode(m3_dir, OVER_LIMIT_TEXTS[:1])
    assert o["multivector"].shape == (8191, 64)


def test_flag_compute_score_matches_encode(m3_dir: Path) -> None:
    pairs = [(SAMPLE[0], SAMPLE[1]), (SAMPLE[2], SAMPLE[2]), ("Hi", SAMPLE[3])]
    w = (0.4, 0.2, 0.4)
    s = R.flag_compute_score(m3_dir, pairs, w)
    enc = R.flag_encode(m3_dir, [t for p in pairs for t in p])
    for i, (q, p) in enumerate(zip(enc[0::2], enc[1::2])):
        dense = float(q["dense"] @ p["dense"])
        sparse = sum(v * p["sparse"].get(k, 0.0) for k, v in q["sparse"].items())
        colbert = float((q["multivector"] @ p["multivector"].T).max(axis=1).mean())
        assert s["dense"][i] == pytest.approx(dense, abs=1e-5)
        assert s["sparse"][i] == pytest.approx(sparse, abs=1e-5)
        assert s["colbert"][i] == pytest.approx(colbert, abs=1e-5)
        hybrid = (w[0] * dense + w[1] * sparse + w[2] * colbert) / sum(w)
        assert s["colbert+sparse+dense"][i] == pytest.approx(hybrid, abs=1e-5)


def test_st_encode_minilm() -> None:
    texts = ["How do I reset my password?", "Steps to reset a forgotten password",
             "The weather in Paris is sunny today."]
    emb = R.st_encode(R.minilm_dir(), texts)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
