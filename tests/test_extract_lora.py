"""LoRA on /v1/extract (`options.lora_id`): GLiNER (DeBERTa-v3 and BERT backbones) and NLI
zero-shot models against their references on peft's merged models (CPU, fp32).

Adapters are made here with peft on the small random-weight checkpoints (random non-zero A
and B): on the whole GLiNER model (backbone linears and gliner's own prompt / span MLPs), on
the GLiNER backbone alone (as gliner's PolyLoRA serving adapts it), and on the NLI models
(stack linears, pooler and classifier). References: `gliner==0.2.29` `inference` and
transformers' zero-shot-classification pipeline on `merge_and_unload()`: same spans, labels
and offsets, scores within 1e-4. Mixed batches (adapters and the base in one forward pass,
held in one batch by the scheduler) give each request its own reference's answer. The DeBERTa
encoder with an adapter per sequence (shared attention keys, and v2's own position
projections) equals peft's merged DebertaV2Model per sequence. Over HTTP: SIE's SDK call with
`lora_id`, an unknown adapter answered as encode answers it, `extract` in `/v1/models`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import held_worker
from lora_adapters import adapt, make_adapter
from make_gliner_test_models import build
from test_gliner import reference, same
from test_nli_zero_shot import _build as build_nli
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DebertaV2Config,
                          DebertaV2Model, pipeline)

from sie_sdk import SIEClient

LABELS = ["person", "organization", "location", "date"]
TEXTS = ["Apple Inc. was founded by Steve Jobs in Cupertino, California in 1976.",
         "Angela Merkel traf Emmanuel Macron in Paris; später flog sie nach Berlin.",
         "Barack Obama visited Nairobi and Jakarta in 2015.",
         "Marie Curie (1867-1934) won two Nobel prizes."]
CLASSES = ["sports", "economy", "technology", "weather", "politics"]
NLI_TEXTS = ["The team won the championship after a dramatic final.",
             "Die Zentralbank hat die Zinsen erneut erhöht.", "I love this phone's camera."]
GLINER_HEADS = ["prompt_rep_layer.0", "prompt_rep_layer.3", "project_start.3", "project_end.0",
                "out_project.0", "out_project.3"]
# adapter id -> (model, what peft wraps: "model" = gliner's span model, "backbone" = its
# encoder alone, "nli" = the sequence classifier; make_adapter keyword arguments)
ADAPTERS = {
    "gliner-deberta/all": ("deberta", "model", dict(
        r=4, targets=["query_proj", "key_proj", "value_proj", "dense", *GLINER_HEADS], seed=1,
        b_std=0.1)),
    "gliner-deberta/backbone": ("deberta", "backbone", dict(
        r=8, targets=["query_proj", "value_proj", "intermediate.dense"], seed=2, b_std=0.15)),
    "gliner-bert/all": ("bert", "model", dict(
        r=4, targets=["query", "key", "value", "dense", "prompt_rep_layer.0", "out_project.3"],
        seed=3, b_std=0.1)),
    "nli-deberta/all": ("nli-deberta", "nli", dict(
        r=4, targets=["query_proj", "key_proj", "value_proj", "dense", "classifier"], seed=4,
        b_std=0.5)),
    "nli-bert/qv-cls": ("nli-bert", "nli", dict(
        r=2, targets=["query", "value", "intermediate.dense", "classifier"], seed=5, b_std=0.5)),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("extract-lora")
    return {"deberta": build(root / "deberta", "deberta", seed=0),
            "bert": build(root / "bert", "bert", seed=1),
            "nli-deberta": build_nli(root / "nli-deberta", "deberta"),
            "nli-bert": build_nli(root / "nli-bert", "bert")}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def refs(folders, root) -> dict:
    """(model, adapter id or None) -> the reference on peft's merged weights: a gliner model,
    or a zero-shot-classification pipeline."""
    out: dict = {}
    for model in ("deberta", "bert"):
        out[(model, None)] = reference(folders[model])
    for model in ("nli-deberta", "nli-bert"):
        out[(model, None)] = _nli_pipeline(folders[model], _nli_model(folders[model]))
    for name, (model, wraps, kw) in ADAPTERS.items():
        if wraps == "nli":
            merged = adapt(_nli_model(folders[model]), root / name, **kw)
            out[(model, name)] = _nli_pipeline(folders[model], merged)
            continue
        ref = reference(folders[model])
        if wraps == "model":
            ref.model = adapt(ref.model, root / name, **kw)
        else:
            layer = ref.model.token_rep_layer.bert_layer
            layer.model = adapt(layer.model, root / name, **kw)
        out[(model, name)] = ref
    return out


def _nli_model(folder: Path):
    return AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()


def _nli_pipeline(folder: Path, model):
    return pipeline("zero-shot-classification", model=model,
                    tokenizer=AutoTokenizer.from_pretrained(str(folder)), device="cpu")


@pytest.fixture(scope="module")
def adapter_roots(root, refs) -> list[Path]:
    """The adapters' folder, once `refs` has saved them (conftest's `engine` reads it)."""
    return [root]


def gliner_expected(refs, model: str, lora: str | None, threshold: float, flat: bool):
    return refs[(model, lora)].inference(TEXTS, LABELS, threshold=threshold, flat_ner=flat)


def nli_expected(refs, model: str, lora: str | None, multi: bool) -> list[dict]:
    return refs[(model, lora)](NLI_TEXTS, candidate_labels=CLASSES, multi_label=multi)


def same_classes(theirs: dict, ours: dict) -> None:
    got = ours["classifications"]
    assert [c["label"] for c in got] == theirs["labels"]
    assert max(abs(c["score"] - s) for c, s in zip(got, theirs["scores"])) <= 1e-4


@pytest.mark.parametrize("model", ["deberta", "bert"])
def test_gliner_adapters_equal_peft_merged(engine, refs, model) -> None:
    names = [None, *(n for n, (m, _, _) in ADAPTERS.items() if m == model)]
    for threshold, flat in ((0.3, True), (0.5, False)):
        base = None
        for lora in names:
            theirs = gliner_expected(refs, model, lora, threshold, flat)
            ours, _ = engine.extract(model, TEXTS, LABELS, {
                "threshold": threshold, "flat_ner": flat, "lora_id": lora})
            assert sum(map(len, theirs)) > 5
            for t, o in zip(theirs, ours, strict=True):
                same(t, o["entities"])
            if lora is None:
                base = ours
            else:  # the adapter changes what is found
                assert ours != base


@pytest.mark.parametrize("model", ["nli-deberta", "nli-bert"])
def test_nli_adapters_equal_peft_merged(engine, refs, model) -> None:
    lora = next(n for n, (m, _, _) in ADAPTERS.items() if m == model)
    for multi in (False, True):
        base, _ = engine.extract(model, NLI_TEXTS, CLASSES, {"multi_label": multi})
        ours, _ = engine.extract(model, NLI_TEXTS, CLASSES, {"multi_label": multi,
                                                             "lora_id": lora})
        for t, o in zip(nli_expected(refs, model, lora, multi), ours, strict=True):
            same_classes(t, o)
        # the adapter changes the answer (the random models score near-uniformly: their
        # single-label scores stay near 1/5, the order changes)
        score = lambda r: {c["label"]: c["score"] for c in r["classifications"]}  # noqa: E731
        order = lambda r: [c["label"] for c in r["classifications"]]  # noqa: E731
        assert any(order(o) != order(b) for o, b in zip(ours, base)) or max(
            abs(score(o)[c] - score(b)[c]) for o, b in zip(ours, base) for c in CLASSES) > 1e-2


@pytest.mark.parametrize("model", ["deberta", "nli-deberta"])
def test_mixed_batch_each_request_its_own_adapter(engine, refs, model) -> None:
    """Requests with different adapters and none, queued while the worker is held, run in
    shared batches; each gets its reference's answer."""
    gliner = model == "deberta"
    names = [n for n, (m, _, _) in ADAPTERS.items() if m == model] + [None]
    jobs = [(names[i % len(names)], i) for i in range(6)]
    texts = TEXTS if gliner else NLI_TEXTS
    labels = LABELS if gliner else CLASSES
    options = {"threshold": 0.3} if gliner else {}
    for n in names[:-1]:
        engine.load_adapter(model, n)
    hold = lambda: engine.submit_extract(model, texts[:1], labels, options)  # noqa: E731
    with held_worker(engine, model, hold) as (_, release, batches):
        futures = [engine.submit_extract(model, [texts[i % len(texts)]], labels,
                                         {**options, "lora_id": n}) for n, i in jobs]
        release()
        results = [f.result(timeout=60)[0][0] for f in futures]
    slots = [{req.adapter_slot for req, _ in batch} for batch in batches[1:]]
    assert max(map(len, slots)) == len(names), slots  # the adapters and the base in one batch
    for (n, i), got in zip(jobs, results):
        if gliner:
            theirs = refs[(model, n)].inference([texts[i % len(texts)]], labels, threshold=0.3)
            same(theirs[0], got["entities"])
        else:
            same_classes(refs[(model, n)](texts[i % len(texts)], candidate_labels=labels), got)


@pytest.mark.parametrize("share", [True, False])
def test_deberta_adapter_per_sequence(tmp_path, share) -> None:
    """Our DeBERTa encoder with two adapters and the base in one packed batch equals peft's
    merged DebertaV2Model of each sequence's adapter: with shared attention keys the key and
    query projections of the relative positions change per sequence too; DeBERTa-v2's own
    position projections are adaptable."""
    from sie_server.runtime.batch import pack, positions
    from sie_server.runtime.deberta import DebertaConfig, DebertaEncoder
    from sie_server.runtime.lora import BaseModelId, StackCache, batch_lora, load_adapter

    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, relative_attention=True,
        position_buckets=8 if share else -1, pos_att_type=["p2c", "c2p"], share_att_key=share,
        position_biased_input=not share, norm_rel_ebd="layer_norm", type_vocab_size=0)
    base = DebertaV2Model(config).eval()
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.2)
    targets = ["query_proj", "key_proj"] + ([] if share else ["pos_key_proj", "pos_query_proj"])
    merged = [adapt(copy.deepcopy(base), tmp_path / "a", r=4, targets=targets, seed=1),
              adapt(copy.deepcopy(base), tmp_path / "b", r=2, seed=2,
                    targets=["value_proj", "dense", *targets[1:]])]
    cfg = DebertaConfig.from_dict(config.to_dict())
    encoder, _ = DebertaEncoder.from_weights(cfg, {k: v.clone() for k, v in base.state_dict().items()})
    ident = BaseModelId(("test",), tmp_path, cfg, "deberta-v2")
    adapters = {}
    for slot, name in enumerate("ab"):
        adapters[slot] = load_adapter(name, tmp_path / name, ident, torch.device("cpu"),
                                      torch.float32)
        adapters[slot].uid = slot
    assert "attention.self.pos_key_proj" in adapters[0].targets or share
    lengths, slots = [5, 30, 12, 9, 20], [0, -1, 1, 0, 1]
    rows = [torch.randint(0, 100, (n,)) for n in lengths]
    batch = pack([r.numpy() for r in rows], frozenset(), np.array(slots))
    cu = batch.cu_seqlens
    with torch.no_grad():
        ours = encoder(torch.from_numpy(batch.input_ids), torch.from_numpy(positions(cu, 0)), None,
                       encoder.layout(cu, torch.device("cpu")),
                       batch_lora(batch, adapters, torch.device("cpu"), StackCache()))
        for i, (row, slot) in enumerate(zip(rows, slots)):
            ref = base if slot < 0 else merged[slot]
            theirs = ref(input_ids=row[None]).last_hidden_state[0]
            torch.testing.assert_close(ours[cu[i]:cu[i + 1]], theirs, atol=1e-5, rtol=1e-5)


GLINER = "urchade/gliner_multi-v2.1"
NLI = "MoritzLaurer/deberta-v3-base-zeroshot-v2.0"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def test_http(start_server, folders, root, engine, minilm_dir) -> None:
    make_adapter(minilm_dir, root / "minilm-q", r=2, targets=["query"], seed=9)
    server = start_server(["--model", f"{GLINER}={folders['deberta']}",
                           "--model", f"{NLI}={folders['nli-deberta']}",
                           "--model", f"{MINILM}={minilm_dir}", "--adapter-root", str(root),
                           "--default-model", GLINER])
    lora = "gliner-deberta/all"
    expected, tokens = engine.extract("deberta", TEXTS[:2], LABELS,
                                      {"threshold": 0.4, "lora_id": lora})
    classes, _ = engine.extract("nli-deberta", NLI_TEXTS[:2], CLASSES,
                                {"lora_id": "nli-deberta/all",
                                 "hypothesis_template": "This text is about {}."})
    with SIEClient(server.url) as client:
        got = client.extract(GLINER, TEXTS[:2], labels=LABELS,
                             options={"threshold": 0.4, "lora_id": lora})
        got_nli = client.extract(NLI, NLI_TEXTS[:2], labels=CLASSES,
                                 options={"lora_id": "nli-deberta/all"})
        models = {m["name"]: m for m in client.list_models()}
    for g, e in zip(got, expected, strict=True):
        assert g["entities"] == [{**x, "bbox": None} for x in e["entities"]]
    for g, e in zip(got_nli, classes, strict=True):
        assert g["classifications"] == e["classifications"]
    assert "extract" in models[GLINER]["tasks"] and "extract" in models[NLI]["tasks"]
    body = {"items": [{"text": TEXTS[0]}],
            "params": {"labels": LABELS, "options": {"lora_id": "org/no-such-adapter"}}}
    missing = httpx.post(f"{server.url}/v1/extract/{GLINER}", json=body, timeout=60)
    encode = httpx.post(f"{server.url}/v1/encode/{MINILM}", timeout=60, json={
        "items": [{"text": TEXTS[0]}], "params": {"options": {"lora_id": "org/no-such-adapter"}}})
    detail = lambda r: {k: v for k, v in r.json()["detail"].items() if k != "request_id"}  # noqa: E731
    assert missing.status_code == encode.status_code == 404
    assert detail(missing) == detail(encode) and detail(missing)["code"] == "LORA_NOT_FOUND"
    body["params"]["options"]["lora_id"] = "minilm-q"  # made for another model
    wrong = httpx.post(f"{server.url}/v1/extract/{GLINER}", json=body, timeout=60)
    assert wrong.status_code == 422 and wrong.json()["detail"]["code"] == "INVALID_ADAPTER"
    assert "made for another base model" in wrong.json()["detail"]["message"]
