"""GLiNER entity extraction against PyPI `gliner==0.2.29` on the same weights (CPU, fp32).

Models: small random-weight checkpoints in the hub layout (scripts/make_gliner_test_models.py,
built and saved by gliner itself): a DeBERTa-v3-shaped backbone with the real 250,002-piece
XLM-R tokenizer (multilingual texts) and a BERT backbone with all-MiniLM-L6-v2's WordPiece.
Reference: `GLiNER.from_pretrained(folder).inference` / `predict_entities` /
`batch_predict_entities`. Same spans, labels, texts and character offsets; scores within 1e-4;
thresholds 0.3 / 0.5 / 0.7, flat and nested, single- and multi-label.

Long texts: with `max_len` 40 words a text of ~150 words is read in windows (SIE's reading);
the reference is gliner on each window's text, its spans moved to the text and merged by the
rule SIE documents (`_word_window.merge_window_spans`), written out here.
Through a real server: our SDK, raw msgpack and JSON, SIE's errors and bad input.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import httpx
import msgpack
import pytest
from make_gliner_test_models import build

from sie_sdk import SIEClient
from sie_sdk.errors import SIEServerError

LABELS = ["person", "organization", "location", "date"]
TEXTS = {
    "deberta": ["Apple Inc. was founded by Steve Jobs in Cupertino, California in 1976.",
                "Angela Merkel traf Emmanuel Macron in Paris; später flog sie nach Berlin.",
                "東京は日本の首都です。 Tokyo is big.", "Москва — столица России, сказал Путин.",
                "one", "  ", "Marie Curie (1867-1934) won two Nobel prizes."],
    "bert": ["Apple Inc. was founded by Steve Jobs in Cupertino, California in 1976.",
             "Barack Obama visited Nairobi and Jakarta in 2015.", "x",
             "Crème brûlée at Café de Flore, rue Saint-Benoît."],
}


def reference(folder: Path):
    from gliner import GLiNER

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GLiNER.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gliner")
    out = {"deberta": build(root / "deberta", "deberta", seed=0),
           "bert": build(root / "bert", "bert", seed=1)}
    out["deberta-40"] = windows_of_40(out["deberta"], root / "deberta-40")
    return out


def windows_of_40(folder: Path, copy: Path) -> Path:
    """A copy of a checkpoint (same weights) that reads windows of 40 words."""
    shutil.copytree(folder, copy)
    config = json.loads((copy / "gliner_config.json").read_text())
    (copy / "gliner_config.json").write_text(json.dumps({**config, "max_len": 40}))
    return copy


def same(theirs: list[dict], ours: list[dict], tol: float = 1e-4) -> None:
    key = lambda e: (e["start"], e["end"], e["label"], e["text"])  # noqa: E731
    assert [key(e) for e in ours] == [key(e) for e in theirs]
    for a, b in zip(theirs, ours):
        assert abs(a["score"] - b["score"]) <= tol


def on_the_wire(engine: list[dict], wire: list[dict]) -> None:
    """The engine's entities as the SDK returns them: each with `bbox` None, the same spans,
    labels and texts, scores within 1e-6 (the same text in another batch: on some CPUs, AVX2
    ones, float GEMMs round a row differently with the batch's token count)."""
    assert all(e.get("bbox", 0) is None for e in wire) and all(set(e) == {*x, "bbox"}
                                                               for e, x in zip(wire, engine))
    same(engine, wire, tol=1e-6)


@pytest.mark.parametrize("backbone", ["deberta", "bert"])
def test_matches_gliner(engine, folders, backbone) -> None:
    ref = reference(folders[backbone])
    texts = TEXTS[backbone]
    found = 0
    for threshold in (0.3, 0.5, 0.7):
        for flat in (True, False):
            for multi in (False, True):
                theirs = ref.inference(texts, LABELS, threshold=threshold, flat_ner=flat,
                                       multi_label=multi)
                blank = [i for i, t in enumerate(texts) if not t.strip()]
                kept = [t for t in texts if t.strip()]
                ours, tokens = engine.extract(backbone, kept, LABELS, {
                    "threshold": threshold, "flat_ner": flat, "multi_label": multi})
                assert tokens > 0
                theirs = [e for i, e in enumerate(theirs) if i not in blank]
                for t, o in zip(theirs, ours, strict=True):
                    same(t, o["entities"])
                    found += len(t)
    assert found > 50  # the thresholds select among many spans
    # the single-text and deprecated batch entry points, repeated labels dropped as gliner does
    text = texts[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same(ref.predict_entities(text, LABELS, threshold=0.4),
             engine.extract(backbone, [text], LABELS + ["person"], {"threshold": 0.4})[0][0]["entities"])
        batch = ref.batch_predict_entities(texts[:2], LABELS[:2], threshold=0.4)
    for t, o in zip(batch, engine.extract(backbone, texts[:2], LABELS[:2], {"threshold": 0.4})[0]):
        same(t, o["entities"])


def _windows(text: str, max_words: int, overlap: int = 64) -> list[tuple[int, int]]:
    """SIE's windows by word count (no subword budget is reached here): char spans."""
    words = [m.span() for m in re.finditer(r"\w+(?:[-_]\w+)*|\S", text)]
    out, start = [], 0
    while True:
        end = min(start + max_words, len(words))
        out.append((words[start][0], words[end - 1][1]))
        if end == len(words):
            return out
        start = end - min(overlap, (end - start) // 2)


def _merge(per_window: list[list[dict]], edges: list[tuple[int, int]], flat: bool) -> list[dict]:
    """SIE's merge of window spans (its `merge_window_spans`), restated."""
    best: dict = {}
    for i, spans in enumerate(per_window):
        for s in spans:
            cut = False
            for j in ([i - 1] if i and s["start"] <= edges[i][0] else []) + \
                    ([i + 1] if i + 1 < len(edges) and s["end"] >= edges[i][1] else []):
                if edges[j][0] <= s["start"] and s["end"] <= edges[j][1] and any(
                        o["label"] == s["label"] and o["start"] < s["end"] and s["start"] < o["end"]
                        for o in per_window[j]):
                    cut = True
            key = (s["start"], s["end"], s["label"])
            if not cut and (key not in best or s["score"] > best[key]["score"]):
                best[key] = s
    kept: list[dict] = []
    for s in sorted(best.values(), key=lambda x: -x["score"]):
        clash = False
        for k in kept:
            disjoint = s["start"] >= k["end"] or k["start"] >= s["end"]
            nested = (s["start"] <= k["start"] and k["end"] <= s["end"]) or \
                (k["start"] <= s["start"] and s["end"] <= k["end"])
            same_span = (s["start"], s["end"]) == (k["start"], k["end"])
            clash |= same_span or (not disjoint and (flat or not nested))
        if not clash:
            kept.append(s)
    return sorted(kept, key=lambda x: x["start"])


def test_long_texts_are_read_in_windows(engine, folders) -> None:
    check_windows(engine, "deberta-40", folders["deberta-40"], ((0.5, True), (0.4, False)))


def check_windows(engine, name: str, folder: Path, settings) -> None:
    """A ~150-word text through a model with windows of 40 words equals gliner on each
    window's text, moved and merged, at each (threshold, flat_ner) of `settings`."""
    ref = reference(folder)
    text = " ".join(TEXTS["deberta"][i % 5] for i in range(12))  # ~150 words, 5+ windows
    edges = _windows(text, 40)
    assert len(edges) >= 5
    for threshold, flat in settings:
        per_window = ref.inference([text[a:b] for a, b in edges], LABELS, threshold=threshold,
                                   flat_ner=flat)
        moved = [[{**e, "start": e["start"] + a, "end": e["end"] + a} for e in spans]
                 for (a, _), spans in zip(edges, per_window)]
        expected = _merge(moved, edges, flat)
        for e in expected:
            e["text"] = text[e["start"]:e["end"]]
        ours = engine.extract(name, [text], LABELS,
                              {"threshold": threshold, "flat_ner": flat})[0][0]["entities"]
        assert len(expected) > 5 and any(e["start"] > edges[1][1] for e in ours)
        same(expected, ours)
    # usage (SIE's GLiNER meter): each subword of the text once, the special tokens once, no
    # label prompt: what one row holding the whole text would read
    from transformers import AutoTokenizer

    words = [m.group() for m in re.finditer(r"\w+(?:[-_]\w+)*|\S", text)]
    whole = AutoTokenizer.from_pretrained(str(folder))(
        words, is_split_into_words=True, truncation=False)["input_ids"]
    assert engine.extract(name, [text], LABELS)[1] == len(whole)


@pytest.fixture(scope="module")
def server(start_module_server, folders, minilm_dir):
    return start_module_server(["--model", f"urchade/gliner_multi-v2.1={folders['deberta']}",
                         "--model", f"sentence-transformers/all-MiniLM-L6-v2={minilm_dir}",
                         "--default-model", "urchade/gliner_multi-v2.1"])


GLINER = "urchade/gliner_multi-v2.1"


def test_http_sdk_msgpack_and_json(server, engine) -> None:
    texts = TEXTS["deberta"][:3]
    expected, tokens = engine.extract("deberta", texts, LABELS, {"threshold": 0.4})
    with SIEClient(server.url) as client:
        one = client.extract(GLINER, {"text": texts[0]}, labels=LABELS, options={"threshold": 0.4})
        many = client.extract(GLINER, [{"text": t, "id": f"d{i}"} for i, t in enumerate(texts)],
                              labels=LABELS, options={"threshold": 0.4})
        models = {m["name"]: m for m in client.list_models()}
    # `one` ran in another batch than `expected`: same entities, scores to float rounding
    on_the_wire(expected[0]["entities"], one["entities"])
    assert [r["id"] for r in many] == ["d0", "d1", "d2"]
    for r, e in zip(many, expected):
        on_the_wire(e["entities"], r["entities"])
        assert r["relations"] == r["objects"] == [] and "data" not in r and r["model"] == GLINER
    assert "extract" in models[GLINER]["tasks"] and "json" in models[GLINER]["outputs"]
    assert models["sentence-transformers/all-MiniLM-L6-v2"]["tasks"] == ["encode"]
    body = {"items": [{"text": texts[0]}], "params": {"labels": LABELS, "options": {"threshold": 0.4}}}
    j = httpx.post(f"{server.url}/v1/extract/{GLINER}", json=body,
                   headers={"Accept": "application/json"}).json()
    m = msgpack.unpackb(httpx.post(f"{server.url}/v1/extract/{GLINER}",
                                   content=msgpack.packb(body),
                                   headers={"Content-Type": "application/msgpack",
                                            "Accept": "application/msgpack"}).content)
    assert j == m and j["model"] == GLINER and j["items"][0]["id"] == "item-0"
    assert set(j["items"][0]) == {"id", "entities", "relations", "classifications", "objects", "data"}
    assert j["usage"]["input_tokens"] > 0


def _post(server, body: dict, model: str = GLINER) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/extract/{model}", json=body, timeout=120,
                      headers={"Accept": "application/json"})


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def test_errors_and_bad_input(server) -> None:
    def refused(body, field, status=400, model=GLINER, code="INVALID_INPUT"):
        r = _post(server, body, model)
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        assert detail["code"] == code and field in detail["message"], detail

    items = [{"text": "Steve Jobs founded Apple."}]
    refused({"items": items}, "params.labels")
    refused({"items": items, "params": {"labels": []}}, "params.labels")
    refused({"items": items, "params": {"labels": [f"l{i}" for i in range(1001)]}}, "params.labels")
    refused({"items": items, "params": {"labels": [f"label {i}" for i in range(1000)]}},
            "params.labels")  # 1,000 labels: more prompt tokens than SIE allows
    refused({"items": items, "params": {"labels": [f"l{i}" for i in range(200)]}},
            "params.labels")  # within the prompt limit, but the 512-token cut leaves no text
    refused({"items": [{"text": ""}], "params": {"labels": ["person"]}}, "items[0].text")
    refused({"items": [{"text": "ok"}, {"text": " \n"}], "params": {"labels": ["x"]}}, "items[1].text")
    refused({"items": items, "params": {"labels": ["x" * 129]}}, "params.labels[0]")
    refused({"items": items, "params": {"labels": ["person"], "options": {"threshold": 2}}},
            "params.options.threshold")
    refused({"items": items, "params": {"labels": ["person"]}}, "does not support extraction",
            model="sentence-transformers/all-MiniLM-L6-v2")
    r = httpx.post(f"{server.url}/v1/extract/{GLINER}", content=b'{"items": [{"text": "a"}], '
                   b'"params": {"labels": ["\\ud800"]}}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "params.labels[0]" in r.json()["detail"]["message"]
    odd = ["pers\u0301on", "🏢 org", "\u200bdate", "רשות", "\x00ctrl"]  # combining, emoji, ZWSP, RTL, NUL
    r = _post(server, {"items": items, "params": {"labels": odd, "options": {"threshold": 0.0}}})
    assert r.status_code == 200 and {e["label"] for e in r.json()["items"][0]["entities"]} <= set(odd)
    before = _rss_kib(server.proc.pid)
    huge = "word " * 2_000_000  # 10 MB
    refused({"items": [{"text": huge}], "params": {"labels": ["person"]}}, "items[0].text")
    long = "word " * 400_000  # 2 MB: within SIE's item limit, more windows than SIE reads
    params = {"labels": ["person", "organization"], "options": {"threshold": 0.3}}
    r = _post(server, {"items": [{"text": long}, *items], "params": params})
    alone = _post(server, {"items": items, "params": params}).json()
    assert r.status_code == 200, r.text  # as SIE: that item's error, the others answered
    first, second = r.json()["items"]
    assert first["entities"] == [] and first["error"] == {
        "code": "INPUT_TOO_LONG", "message": "GLiNER reads a document in at most 128 windows "
        "of words; split this document into shorter items"}
    assert "error" not in second and second["entities"] == alone["items"][0]["entities"]
    assert r.json()["usage"] == alone["usage"]  # the item not read counts no tokens
    with SIEClient(server.url) as client:
        got = client.extract(GLINER, [long, items[0]["text"]], labels=["person"])
    assert got[0]["error"]["code"] == "INPUT_TOO_LONG" and "error" not in got[1]
    assert _rss_kib(server.proc.pid) - before < 400 * 1024  # bounded: no 10 MB text expanded
    with SIEClient(server.url) as client, pytest.raises(SIEServerError) as e:
        client.extract(GLINER, ["text"], labels=None)
    assert e.value.status == 400


def test_public_sdk_and_integrations(sie_python, server, engine, tmp_path) -> None:
    """SIE's own `sie-sdk` 0.10.1 `extract`, and the extractor components of sie-langchain,
    sie-llamaindex and sie-lancedb (tests/sie_public/driver.py), against the server; what they
    return equals the engine's entities."""
    from conftest import run_public

    _, info = run_public(sie_python, "extract", server.url, tmp_path)
    texts = ["Apple Inc. was founded by Steve Jobs in Cupertino, California in 1976.",
             "Angela Merkel traf Emmanuel Macron in Paris.", "東京は日本の首都です。"]
    labels = ["person", "organization", "location"]
    expected = [r["entities"] for r in engine.extract("deberta", texts, labels, {"threshold": 0.4})[0]]
    assert sum(map(len, expected)) > 3
    wire = [[{**e, "bbox": None} for e in ents] for ents in expected]
    assert info["one"] == {"entities": wire[0], "relations": [], "classifications": [],
                           "objects": [], "id": "item-0", "model": GLINER}
    assert info["many"] == [{"id": f"t{i}", "entities": w, "model": GLINER} for i, w in enumerate(wire)]
    assert info["errors"] == ["RequestError", "RequestError"]
    plain = [{k: e[k] for k in ("text", "label", "score", "start", "end")} for e in expected[0]]
    assert info["langchain"]["entities"] == plain
    assert info["llamaindex"]["entities"] == plain
    assert info["lancedb"] == wire
    assert [[{k: e[k] for k in ("text", "label", "start", "end")} for e in row]
            for row in info["lancedb_table"]] == \
        [[{k: e[k] for k in ("text", "label", "start", "end")} for e in ents] for ents in expected]


def test_haystack_dspy_crewai_extractors(server, engine, tmp_path) -> None:
    """sie-haystack's SIEExtractor, sie-dspy's SIEExtractor and sie-crewai's SIEExtractorTool
    (their own environment: their dependencies clash with .venv-sie-public's) against the
    server: the engine's entities."""
    import subprocess

    from conftest import ROOT, run_public

    setup = subprocess.run([str(ROOT / "scripts" / "setup-sie-public.sh"), "extract"],
                           capture_output=True, text=True, timeout=1800)
    if setup.returncode == 3:
        pytest.skip(setup.stderr.strip())
    assert setup.returncode == 0, setup.stderr[-3000:]
    _, info = run_public(setup.stdout.strip().splitlines()[-1], "extract_more", server.url, tmp_path)
    text = "Apple Inc. was founded by Steve Jobs in Cupertino, California in 1976."
    expected = engine.extract("deberta", [text], ["person", "organization", "location"],
                              {"threshold": 0.4})[0][0]["entities"]
    plain = [{k: e[k] for k in ("text", "label", "score", "start", "end")} for e in expected]
    assert plain and info["dspy"] == plain
    assert [{k: e[k] for k in plain[0]} for e in info["haystack"]] == plain
    assert all(f"- {e['text']} ({e['label']}) [confidence: {e['score']:.2f}]" in info["crewai"]
               for e in expected)


def test_merge_adjacent_entities(engine) -> None:
    """SIE's merge rule (its GLiNER adapter's `_merge_entities`): same label, at most one
    character apart, in text order; text from the original, best score."""
    from sie_server.models.gliner import merge_adjacent

    text = "Steve Jobs and Woz, Apple"
    parts = [{"start": 6, "end": 10, "label": "person", "score": 0.7, "text": "Jobs"},
             {"start": 0, "end": 5, "label": "person", "score": 0.6, "text": "Steve"},
             {"start": 15, "end": 18, "label": "person", "score": 0.9, "text": "Woz"},
             {"start": 20, "end": 25, "label": "organization", "score": 0.5, "text": "Apple"}]
    assert merge_adjacent(parts, text) == [
        {"start": 0, "end": 10, "label": "person", "score": 0.7, "text": "Steve Jobs"},
        parts[2], parts[3]]
    one, _ = engine.extract("deberta", [TEXTS["deberta"][0]], LABELS,
                            {"threshold": 0.3, "merge_adjacent_entities": True})
    plain, _ = engine.extract("deberta", [TEXTS["deberta"][0]], LABELS, {"threshold": 0.3})
    assert one[0]["entities"] == merge_adjacent(plain[0]["entities"], TEXTS["deberta"][0])


def test_profiles_set_extract_defaults_as_gliner_takes_them(folders, tmp_path) -> None:
    """A profile's threshold / flat_ner (SIE's configs set `threshold` so) are extract's
    defaults, by `model:profile` or `options.profile`; the request's own options win; the
    entities equal gliner's with those settings. A bad profile value stops the catalog."""
    import yaml

    from sie_server.config import Settings
    from sie_server.engine import Engine
    from sie_server.errors import InvalidRequest

    texts = [t for t in TEXTS["deberta"] if t.strip()]
    entry = {"family": "gliner", "source": str(folders["deberta"]),
             "profiles": {"loose": {"threshold": 0.3, "flat_ner": False}}}
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": {"gl": entry}}))
    eng = Engine(Settings(catalog_files=[catalog], default_models=[], device="cpu",
                          dtype="float32"))
    try:
        by_suffix = eng.extract("gl:loose", texts, LABELS)[0]
        by_option = eng.extract("gl", texts, LABELS, {"profile": "loose"})[0]
        stricter = eng.extract("gl:loose", texts, LABELS, {"threshold": 0.7})[0]
        with pytest.raises(InvalidRequest, match="Profile 'tight' not found"):
            eng.extract("gl", texts, LABELS, {"profile": "tight"})
    finally:
        eng.close()
    ref = reference(folders["deberta"])
    loose = ref.inference(texts, LABELS, threshold=0.3, flat_ner=False)
    strict = ref.inference(texts, LABELS, threshold=0.7, flat_ner=False)
    assert sum(map(len, loose)) > sum(map(len, strict)) > 0
    for theirs, a, b in zip(loose, by_suffix, by_option, strict=True):
        same(theirs, a["entities"])
        same(theirs, b["entities"])
    for theirs, ours in zip(strict, stricter, strict=True):
        same(theirs, ours["entities"])
    entry["profiles"]["loose"]["threshold"] = 1.5
    catalog.write_text(yaml.safe_dump({"models": {"gl": entry}}))
    with pytest.raises(ValueError, match="profile 'loose': threshold must be a finite number "
                       "between 0 and 1"):
        Engine(Settings(catalog_files=[catalog], default_models=[], device="cpu"))
