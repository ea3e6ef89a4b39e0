"""GLiClass zero-shot classification against PyPI `gliclass==0.1.17` on the same weights (CPU, fp32).

Models: small random-weight checkpoints in the hub layout (scripts/make_gliclass_test_models.py,
built and saved by gliclass itself), three configurations: a DeBERTa-v3-shaped backbone with
the real XLM-R tokenizer, text first, `weighted-dot` scorer; the same backbone with the labels
first, `simple` scorer, `normalize_features`, an LSTM and `embed_class_token` false; a BERT
backbone with the labels first, the `mlp` scorer and `class_token_pooling: average`; a
ModernBERT backbone (sliding-window layers) with the labels first, as gliclass-modern-*.
Reference: the `ZeroShotClassificationPipeline` (its `__call__`, single- and multi-label), and
every label's probability as SIE's GLiClass adapter takes it from the pipeline's model (its
`prepare_inputs`, the model's logits, softmax or sigmoid). Same labels, scores within 1e-4,
with and without an instruction, a text longer than the 1,024-token window. Configurations not
read here are refused at load, naming the key.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import httpx
import pytest
import torch
from make_gliclass_test_models import build

from sie_sdk import SIEClient
from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.errors import InputTooLong, ModelLoadFailed

LABELS = ["sports", "economy", "technology", "weather", "politics"]
TEXTS = ["The team won the championship after a dramatic final.",
         "Die Zentralbank hat die Zinsen erneut erhöht.", "I love this phone's camera.",
         "Il pleut depuis trois jours.", "東京は日本の首都です。"]
CONFIGS = {
    "a": ("deberta", {"scorer_type": "weighted-dot"}),
    "b": ("deberta", {"prompt_first": True, "normalize_features": True, "use_lstm": True,
                      "embed_class_token": False}),
    "c": ("bert", {"prompt_first": True, "scorer_type": "mlp", "class_token_pooling": "average"}),
    "d": ("modernbert", {"prompt_first": True}),
}
LONG = " ".join(["The match went to extra time and the crowd cheered loudly."] * 150)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gliclass")
    return {name: build(root / name, backbone, seed=i, **options)
            for i, (name, (backbone, options)) in enumerate(CONFIGS.items())}


def reference(folder: Path, kind: str):
    from gliclass import GLiClassModel, ZeroShotClassificationPipeline
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GLiClassModel.from_pretrained(str(folder))
        return ZeroShotClassificationPipeline(model, AutoTokenizer.from_pretrained(str(folder)),
                                              classification_type=kind, device="cpu",
                                              progress_bar=False)


def probabilities(pipe, texts: list[str], labels: list[str], kind: str,
                  prompt: str | None = None) -> list[list[float]]:
    """Every label's probability, as SIE's adapter computes it with the pipeline's model."""
    inner = pipe.pipe
    with torch.no_grad():
        inputs = inner.prepare_inputs(texts, labels, same_labels=True, prompt=prompt)
        logits = inner.model(**inputs, max_num_classes=len(labels)).logits
    probs = torch.sigmoid(logits) if kind == "multi-label" or len(labels) == 1 \
        else torch.softmax(logits, -1)
    return probs.tolist()


def check(expected: list[float], labels: list[str], got: list[dict]) -> None:
    order = sorted(range(len(labels)), key=lambda j: -expected[j])
    assert [c["label"] for c in got] == [labels[j] for j in order]
    assert max(abs(c["score"] - expected[j]) for c, j in zip(got, order)) <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_gliclass(engine, folders, name) -> None:
    texts = TEXTS if CONFIGS[name][0] != "bert" else TEXTS[:3]
    for kind in ("single-label", "multi-label"):
        pipe = reference(folders[name], kind)
        for prompt in (None, "Classify the topic of this text:"):
            options = {"classification_type": kind, "instruction": prompt}
            ours, tokens = engine.extract(name, texts, LABELS, options)
            assert tokens > 0
            for e, o in zip(probabilities(pipe, texts, LABELS, kind, prompt), ours, strict=True):
                check(e, LABELS, o["classifications"])
        # the pipeline's own answer: the best label, or the labels at or above 0.5
        theirs = pipe(texts, LABELS, threshold=0.5)
        ours, _ = engine.extract(name, texts, LABELS, {
            "classification_type": kind, **({"threshold": 0.5} if kind == "multi-label" else {})})
        for t, o in zip(theirs, ours, strict=True):
            got = o["classifications"][:1] if kind == "single-label" else o["classifications"]
            assert sorted(c["label"] for c in got) == sorted(c["label"] for c in t)
            by_label = {c["label"]: c["score"] for c in got}
            assert all(abs(by_label[c["label"]] - c["score"]) <= 1e-4 for c in t)
        one, _ = engine.extract(name, texts[:1], LABELS[:1], {"classification_type": kind})
        check(probabilities(pipe, texts[:1], LABELS[:1], kind)[0], LABELS[:1],
              one[0]["classifications"])  # a lone label: its sigmoid (SIE), not softmax's 1.0


def test_long_texts(engine, folders) -> None:
    """Labels first: the text is cut at the window, as the pipeline cuts it; text first: a
    text that pushes the labels out of the window is refused (SIE: INPUT_TOO_LONG)."""
    pipe = reference(folders["b"], "single-label")
    ours, _ = engine.extract("b", [LONG, TEXTS[0]], LABELS)
    assert len(pipe.pipe.prepare_inputs([LONG], LABELS, same_labels=True)["input_ids"][0]) == 1024
    for e, o in zip(probabilities(pipe, [LONG, TEXTS[0]], LABELS, "single-label"), ours):
        check(e, LABELS, o["classifications"])
    with pytest.raises(InputTooLong, match=r"items\[1\]\.text"):
        engine.extract("a", [TEXTS[0], LONG], LABELS)


def test_through_the_server(start_server, folders, engine) -> None:
    name = "knowledgator/gliclass-small-v1.0"
    server = start_server(["--model", f"{name}={folders['a']}", "--default-model", name])
    expected, _ = engine.extract("a", TEXTS[:2], LABELS, {"classification_type": "multi-label",
                                                           "threshold": 0.3})
    with SIEClient(server.url) as client:
        got = client.extract(name, TEXTS[:2], labels=LABELS,
                             options={"classification_type": "multi-label", "threshold": 0.3})
        models = {m["name"]: m for m in client.list_models()}
    assert "extract" in models[name]["tasks"]
    for g, e in zip(got, expected):
        assert g["classifications"] == e["classifications"] and g["entities"] == []

    def refused(body: dict, field: str) -> None:
        r = httpx.post(f"{server.url}/v1/extract/{name}", json=body, timeout=60,
                       headers={"Accept": "application/json"})
        assert 400 <= r.status_code < 500 and field in r.json()["detail"]["message"], r.text

    items = [{"text": TEXTS[0]}]
    refused({"items": items}, "params.labels")
    refused({"items": items, "params": {"labels": ["a", "a "]}}, "params.labels")
    refused({"items": items, "params": {"labels": ["a"], "options": {"classification_type": "x"}}},
            "params.options.classification_type")
    refused({"items": [{"text": " "}], "params": {"labels": ["a"]}}, "items[0].text")
    refused({"items": [{"text": LONG}], "params": {"labels": LABELS}}, "items[0].text")
    refused({"items": items, "params": {"labels": ["a"], "options": {"lora_id": "org/adapter"}}},
            "params.options.lora_id")


def test_unread_configurations_are_refused_by_name(folders, tmp_path) -> None:
    for key, value in (("scorer_type", "cross-attn"), ("squeeze_layers", True),
                       ("architecture_type", "bi-encoder")):
        bad = tmp_path / key
        shutil.copytree(folders["a"], bad)
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config, key: value}))
        eng = Engine(Settings(dtype="float32", device="cpu", default_models=[],
                              models={"bad": str(bad)}))
        try:
            with pytest.raises(ModelLoadFailed, match=f"GLiClass {key}"):
                eng.extract("bad", TEXTS[:1], LABELS)
        finally:
            eng.close()
