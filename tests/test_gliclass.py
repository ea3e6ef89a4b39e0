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

Texts too long for the window, as SIE's GLiClass adapter treats them (`options.overflow_policy`
`default` / `truncate_text` / `error`): `sie_reads` restates its rules with the model's
transformers tokenizer and gliclass's own prompt (`prepare_input`); the items it reads score as
the pipeline scores what it reads, the others get an `INPUT_TOO_LONG` item error and the request
still succeeds; through a real server with our SDK and with SIE's public `sie-sdk` 0.10.1.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import httpx
import pytest
import torch
from conftest import run_public
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
WINDOW = 1024  # SIE's max_sequence_length of every GLiClass model, the pipeline's max_length


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
    """Every label once, each score within 1e-4 of the reference's, best first. (Labels whose
    scores are that close may come in either order: 240 labels at ~0.004 differ by ~1e-6.)"""
    assert sorted(c["label"] for c in got) == sorted(labels)
    reference = dict(zip(labels, expected, strict=True))
    assert max(abs(c["score"] - reference[c["label"]]) for c in got) <= 1e-4
    scores = [c["score"] for c in got]
    assert scores == sorted(scores, reverse=True)


def sie_billed(folder: Path, texts: list[str], instruction: str | None) -> int:
    """SIE's GLiClass usage for texts that fit the window: each text's tokens with the special
    tokens, plus the instruction's (alone, without them); label names are not billed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    context = len(tok(instruction, add_special_tokens=False)["input_ids"]) if instruction else 0
    return sum(len(ids) + context for ids in tok(texts)["input_ids"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_gliclass(engine, folders, name) -> None:
    texts = TEXTS if CONFIGS[name][0] != "bert" else TEXTS[:3]
    for kind in ("single-label", "multi-label"):
        pipe = reference(folders[name], kind)
        for prompt in (None, "Classify the topic of this text:"):
            options = {"classification_type": kind, "instruction": prompt}
            ours, tokens = engine.extract(name, texts, LABELS, options)
            assert tokens == sie_billed(folders[name], texts, prompt)
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


def sie_reads(pipe, texts: list[str], labels: list[str], policy: str,
              prompt: str | None = None) -> list[str | None]:
    """What SIE's GLiClass adapter scores of each text under `policy` (None: the item's
    INPUT_TOO_LONG error), its rules restated with the model's transformers tokenizer: the
    label prompt, instruction and text tokenized apart, without special tokens. `truncate_text`
    and `error` measure the text against the window less the prompt and the special tokens:
    one that does not fit is cut to its tokens that do, decoded (`truncate_text`), or fails
    (`error`). Then a model reading the text first fails an item whose labels the cut at the
    window leaves incomplete (SIE decides on an estimate where it is 8 tokens or more from the
    edge, exactly nearer it: the same answer); one reading the labels first fails every item
    under `default` when they leave the text under 8 tokens."""
    inner = pipe.pipe
    tok, config = inner.tokenizer, inner.model.config
    alone = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    special = tok.num_special_tokens_to_add(pair=False)
    out: list[str | None] = list(texts)
    if policy != "default":
        overhead = len(alone(inner.prepare_input("", labels, prompt=prompt))) + special
        for i, text in enumerate(texts):
            ids = alone(text)
            if len(ids) + overhead > WINDOW:
                out[i] = None if policy == "error" else \
                    tok.decode(ids[:WINDOW - overhead], skip_special_tokens=True)
    if config.prompt_first:
        room = WINDOW - special - len(alone(inner.prepare_input("", labels))) - \
            (len(alone(prompt)) if prompt else 0)
        return [None] * len(texts) if policy == "default" and room < 8 else out
    for i, text in enumerate(out):
        if text is not None:
            ids = tok(inner.prepare_input(text, labels, prompt=prompt), truncation=True,
                      max_length=WINDOW)["input_ids"]
            marker = config.class_token_index
            if ids.count(marker) < alone(text).count(marker) + len(labels):
                out[i] = None
    return out


def same_as_sie(pipe, ours: list[dict], texts: list[str], labels: list[str], policy: str,
                prompt: str | None = None) -> list[str | None]:
    """`ours` is what SIE answers: INPUT_TOO_LONG where it reads nothing, else the pipeline's
    probabilities of what it reads; returns what it reads."""
    reads = sie_reads(pipe, texts, labels, policy, prompt)
    kept = [t for t in reads if t is not None]
    probs = iter(probabilities(pipe, kept, labels, "single-label", prompt) if kept else [])
    for read, got in zip(reads, ours, strict=True):
        if read is None:
            assert got["classifications"] == [] and got["error"]["code"] == "INPUT_TOO_LONG", got
        else:
            assert "error" not in got
            check(next(probs), labels, got["classifications"])
    return reads


@pytest.mark.parametrize("name", ["a", "b"])
def test_overflow_policies(engine, folders, name) -> None:
    """Text first ("a") and labels first ("b"): every policy, and a text at the edge of what
    `error` accepts (its tokens fill the room exactly) beside one a token longer."""
    pipe = reference(folders[name], "single-label")
    tok = pipe.pipe.tokenizer
    overhead = len(tok(pipe.pipe.prepare_input("", LABELS), add_special_tokens=False)[
        "input_ids"]) + tok.num_special_tokens_to_add(pair=False)
    ids = tok(LONG, add_special_tokens=False)["input_ids"]
    edge, past = (tok.decode(ids[:WINDOW - overhead + k]) for k in (0, 1))
    texts = [TEXTS[0], LONG, edge, past, TEXTS[1]]
    first = name == "a"
    for policy, unread in ((None, {1} if first else set()), ("truncate_text", set()),
                           ("error", {1, 3})):
        ours, tokens = engine.extract(name, texts, LABELS, {"overflow_policy": policy})
        reads = same_as_sie(pipe, ours, texts, LABELS, policy or "default")
        assert {i for i, r in enumerate(reads) if r is None} == unread  # what is tested
        assert tokens > 0
    prompt = "Classify the topic of this text:"
    ours, _ = engine.extract(name, texts, LABELS, {"overflow_policy": "truncate_text",
                                                   "instruction": prompt})
    assert len(pipe.pipe.prepare_inputs([LONG], LABELS, same_labels=True)["input_ids"][0]) == WINDOW
    same_as_sie(pipe, ours, texts, LABELS, "truncate_text", prompt)


@pytest.mark.parametrize("name", ["a", "d"])
def test_truncate_text_decodes_as_transformers(engine, folders, name) -> None:
    """`truncate_text` turns the kept tokens back into text as SIE does (transformers'
    `decode`, special tokens skipped): the XLM-R tokenizer without the clean-up of spaces
    before punctuation, ModernBERT's with it (its tokenizer_config.json asks for it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folders[name]))
    model = engine.registry.get(name).model
    assert model.clean_up_spaces == (name == "d")
    for text in [*TEXTS, "Wait , what ? It 's over ! They 're here , aren't they ?", LONG[:300]]:
        ids = tok(text)["input_ids"]  # with the special tokens, which decoding skips
        for cut in (len(ids), len(ids) // 2):
            assert model._decode(ids[:cut]) == tok.decode(ids[:cut], skip_special_tokens=True)


def test_labels_that_leave_no_room(engine, folders) -> None:
    """Labels first: labels leaving the text under 8 tokens fail every item under `default`
    (SIE's item errors, the request answered), `truncate_text` reads the few tokens left;
    text first: labels past the window refuse the request, naming params.labels."""
    pipe = reference(folders["b"], "single-label")
    tok = pipe.pipe.tokenizer
    labels = []
    while True:  # each label adds under 8 tokens: the room passes through 1..7
        labels.append(f"topic number {len(labels)}")
        room = WINDOW - 2 - len(tok(pipe.pipe.prepare_input("", labels),
                                    add_special_tokens=False)["input_ids"])
        if room < 8:
            break
    assert 0 < room < 8
    texts = [TEXTS[0], LONG]
    ours, tokens = engine.extract("b", texts, labels)
    assert same_as_sie(pipe, ours, texts, labels, "default") == [None, None] and tokens == 0
    ours, _ = engine.extract("b", texts, labels, {"overflow_policy": "truncate_text"})
    assert None not in same_as_sie(pipe, ours, texts, labels, "truncate_text")
    with pytest.raises(InputTooLong, match=r"params\.labels"):
        engine.extract("a", texts, [f"topic number {i}" for i in range(400)])


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
    refused({"items": items, "params": {"labels": ["a"], "options": {"overflow_policy": "cut"}}},
            "params.options.overflow_policy")
    # a text too long for the window: that item's INPUT_TOO_LONG, the others answered (SIE)
    for policy in (None, "error"):
        with SIEClient(server.url) as client:
            got = client.extract(name, [TEXTS[0], LONG], labels=LABELS,
                                 options={"overflow_policy": policy})
        assert got[0]["classifications"] == engine.extract("a", TEXTS[:1], LABELS)[0][0][
            "classifications"] and "error" not in got[0]
        assert got[1]["classifications"] == [] and got[1]["error"]["code"] == "INPUT_TOO_LONG"
    cut, _ = engine.extract("a", [LONG], LABELS, {"overflow_policy": "truncate_text"})
    with SIEClient(server.url) as client:
        got = client.extract(name, [LONG], labels=LABELS,
                             options={"overflow_policy": "truncate_text"})
    assert got[0]["classifications"] == cut[0]["classifications"] and "error" not in got[0]


def test_public_sdk(sie_python, start_server, folders, engine, tmp_path) -> None:
    """SIE's own `sie-sdk` 0.10.1 `extract` (tests/sie_public/driver.py) on a GLiClass model
    with a text too long for the window, under each overflow policy: the engine's answers,
    the item error as SIE's client returns it."""
    name = "knowledgator/gliclass-small-v1.0"
    server = start_server(["--model", f"{name}={folders['a']}", "--default-model", name])
    _, info = run_public(sie_python, "gliclass", server.url, tmp_path)
    assert info["texts"] == [TEXTS[0], LONG] and info["labels"] == LABELS
    for policy in ("default", "truncate_text", "error"):
        want, _ = engine.extract("a", [TEXTS[0], LONG], LABELS, {"overflow_policy": policy})
        got = info[policy]
        assert [g["classifications"] for g in got] == [w["classifications"] for w in want]
        assert [g.get("error") for g in got] == [w.get("error") for w in want]
    assert info["truncate_text"][1].get("error") is None and info["error"][1]["error"]["code"] == \
        "INPUT_TOO_LONG"


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
