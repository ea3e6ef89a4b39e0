"""LoRA on GLiClass (`options.lora_id` on /v1/extract) against peft's merged model on PyPI
`gliclass==0.1.17` (CPU, fp32).

The random-weight checkpoints of tests/test_gliclass.py (scripts/make_gliclass_test_models.py)
on three backbones: DeBERTa-v3 (text first, `weighted-dot` scorer), BERT (labels first, `mlp`
scorer, averaged label tokens) and ModernBERT (labels first). Adapters are made here with peft
(`get_peft_model` on the `GLiClassModel`, random non-zero A and B) on the backbone's linears
and on gliclass's own: the text and class projectors and the scorer's linears. Reference: the
merged model (`merge_and_unload()`) in gliclass's pipeline, every label's probability as SIE's
adapter takes it (`probabilities`): same order, scores within 1e-4, single- and multi-label.
Requests with different adapters and none, held in one batch, each get their own reference's
answer. Over HTTP: our SDK's `extract` with `lora_id`.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import pytest
from conftest import held_worker
from lora_adapters import adapt
from make_gliclass_test_models import build
from test_gliclass import CONFIGS, LABELS, TEXTS, check, probabilities

from sie_sdk import SIEClient

HEADS = ["linear_1", "linear_2"]  # both projectors' linears
# adapter id -> (model, make_adapter keyword arguments)
ADAPTERS = {
    "deberta/all": ("a", dict(r=4, seed=1, b_std=0.2, targets=[
        "query_proj", "key_proj", "value_proj", "dense", *HEADS, "proj_text", "proj_label",
        "out_mlp.0", "out_mlp.3"])),
    "deberta/backbone": ("a", dict(r=8, seed=2, b_std=0.2, targets=[
        "query_proj", "value_proj", "intermediate.dense"])),
    "bert/all": ("c", dict(r=4, seed=3, b_std=0.2, targets=[
        "query", "value", "dense", "text_projector.linear_1", "mlp.0", "mlp.4"])),
    "modernbert/all": ("d", dict(r=4, seed=4, b_std=0.6, targets=["Wqkv", "Wo", "Wi", *HEADS])),
}
MODELS = ("a", "c", "d")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gliclass-lora")
    return {name: build(root / name, CONFIGS[name][0], seed=i, **CONFIGS[name][1])
            for i, name in enumerate(CONFIGS) if name in MODELS}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gliclass-adapters")


@functools.cache
def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _pipeline(folder: Path, model, kind: str):
    from gliclass import ZeroShotClassificationPipeline

    return ZeroShotClassificationPipeline(model, _tokenizer(folder), classification_type=kind,
                                          device="cpu", progress_bar=False)


def _model(folder: Path):
    from gliclass import GLiClassModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GLiClassModel.from_pretrained(str(folder)).eval()


@pytest.fixture(scope="module")
def refs(folders, root) -> dict:
    """(adapter id or None, model) -> (the merged or base GLiClassModel, its folder)."""
    out: dict = {(None, m): (_model(folders[m]), folders[m]) for m in MODELS}
    for name, (model, kw) in ADAPTERS.items():
        out[(name, model)] = (adapt(_model(folders[model]), root / name, **kw), folders[model])
    return out


def expected(refs, lora: str | None, model: str, texts: list[str], kind: str) -> list[list[float]]:
    merged, folder = refs[(lora, model)]
    return probabilities(_pipeline(folder, merged, kind), texts, LABELS, kind)


@pytest.fixture(scope="module")
def adapter_roots(root, refs) -> list[Path]:
    """The adapters' folder, once `refs` has saved them (conftest's `engine` reads it)."""
    return [root]


@pytest.mark.parametrize("model", MODELS)
def test_adapters_equal_peft_merged(engine, refs, model) -> None:
    texts = TEXTS[:3]
    for lora in (n for n, (m, _) in ADAPTERS.items() if m == model):
        for kind in ("single-label", "multi-label"):
            ours, _ = engine.extract(model, texts, LABELS, {"classification_type": kind,
                                                             "lora_id": lora})
            theirs = expected(refs, lora, model, texts, kind)
            for e, o in zip(theirs, ours, strict=True):
                check(e, LABELS, o["classifications"])
            base = expected(refs, None, model, texts, kind)
            # the adapter changes the scores (a test of the adapter, not of the base)
            assert max(abs(x - y) for e, b in zip(theirs, base) for x, y in zip(e, b)) > 1e-3


def test_mixed_batch_each_request_its_own_adapter(engine, refs) -> None:
    """Requests with two adapters and none, queued while the worker is held, share batches;
    each gets its reference's answer."""
    names = ["deberta/all", "deberta/backbone", None]
    jobs = [(names[i % 3], TEXTS[i % len(TEXTS)]) for i in range(6)]
    for n in names[:2]:
        engine.load_adapter("a", n)
    hold = lambda: engine.submit_extract("a", TEXTS[:1], LABELS)  # noqa: E731
    with held_worker(engine, "a", hold) as (_, release, batches):
        futures = [engine.submit_extract("a", [text], LABELS, {"lora_id": n}) for n, text in jobs]
        release()
        results = [f.result(timeout=60)[0][0] for f in futures]
    slots = [{req.adapter_slot for req, _ in batch} for batch in batches[1:]]
    assert max(map(len, slots)) == 3, slots  # both adapters and the base in one batch
    for (n, text), got in zip(jobs, results):
        check(expected(refs, n, "a", [text], "single-label")[0], LABELS, got["classifications"])


def test_http(start_server, folders, engine) -> None:
    name = "knowledgator/gliclass-modern-base-v3.0"
    server = start_server(["--model", f"{name}={folders['d']}", "--default-model", name,
                           "--adapter-root", str(engine.settings.adapter_roots[0])])
    options = {"lora_id": "modernbert/all", "classification_type": "multi-label"}
    want, _ = engine.extract("d", TEXTS[:2], LABELS, options)
    base, _ = engine.extract("d", TEXTS[:2], LABELS, {"classification_type": "multi-label"})
    with SIEClient(server.url) as client:
        got = client.extract(name, TEXTS[:2], labels=LABELS, options=options)
    assert [g["classifications"] for g in got] == [w["classifications"] for w in want]
    assert want != base
