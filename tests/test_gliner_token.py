"""NuNER Zero and token-level GLiNER against PyPI `gliner==0.2.29` on the same weights (CPU, fp32).

Models: small random-weight checkpoints built and saved by gliner itself
(scripts/make_gliner_test_models.py) with the DeBERTa-v3-shaped backbone and the real XLM-R
tokenizer: `span_mode: token_level` (gliner's UniEncoderToken: start/end/inside scores per
word and label, `TokenDecoder`), and `span_mode: marker` with `max_width` 1, the
configuration of numind/NuNER_Zero (one-word spans that SIE joins with
`merge_adjacent_entities`, its runtime option for that model). Same spans, labels, texts and
character offsets as `GLiNER.inference`; scores within 1e-4; thresholds 0.3 / 0.5 / 0.7,
flat and nested, single- and multi-label; a token-level text longer than one window (gliner on
each window, merged by SIE's rule, as tests/test_gliner.py states it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from make_gliner_test_models import build
from test_gliner import LABELS, TEXTS, _merge, _windows, reference, same

from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.models.gliner import merge_adjacent

NUNER = "numind/NuNER_Zero"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gliner-token")
    out = {"token": build(root / "token", "deberta", seed=2, span_mode="token_level"),
           NUNER: build(root / "nuner", "deberta", seed=3, span_mode="marker", max_width=1)}
    short = root / "token-40"  # same weights, windows of 40 words
    shutil.copytree(out["token"], short)
    config = json.loads((short / "gliner_config.json").read_text())
    (short / "gliner_config.json").write_text(json.dumps({**config, "max_len": 40}))
    out["token-40"] = short
    return out


@pytest.fixture(scope="module")
def engine(folders: dict[str, Path]):
    eng = Engine(Settings(dtype="float32", device="cpu", default_models=[],
                          models={k: str(v) for k, v in folders.items()}))
    yield eng
    eng.close()


@pytest.mark.parametrize("name", ["token", NUNER])
def test_matches_gliner(engine, folders, name) -> None:
    ref = reference(folders[name])
    assert type(ref).__name__ == ("UniEncoderTokenGLiNER" if name == "token" else "UniEncoderSpanGLiNER")
    texts = [t for t in TEXTS["deberta"] if t.strip()]
    found, words = 0, 0
    for threshold in (0.3, 0.5, 0.7):
        for flat in (True, False):
            for multi in (False, True):
                theirs = ref.inference(texts, LABELS, threshold=threshold, flat_ner=flat,
                                       multi_label=multi)
                ours, _ = engine.extract(name, texts, LABELS, {
                    "threshold": threshold, "flat_ner": flat, "multi_label": multi,
                    "merge_adjacent_entities": False})
                for t, o in zip(theirs, ours, strict=True):
                    same(t, o["entities"])
                    found += len(t)
                    words = max(words, *(len(e["text"].split()) for e in t), 0)
    assert found > (50 if name == "token" else 30)
    assert words > 1 if name == "token" else words == 1  # token spans have any length


def test_nuner_zero_merges_by_default(engine) -> None:
    """The catalog's numind/NuNER_Zero entry merges touching entities of one label, as SIE's."""
    texts = [t for t in TEXTS["deberta"] if t.strip()]
    plain, _ = engine.extract(NUNER, texts, LABELS, {"threshold": 0.1, "merge_adjacent_entities": False})
    merged, _ = engine.extract(NUNER, texts, LABELS, {"threshold": 0.1})
    for text, p, m in zip(texts, plain, merged):
        assert m["entities"] == merge_adjacent(p["entities"], text)
    assert sum(len(m["entities"]) for m in merged) < sum(len(p["entities"]) for p in plain)


def test_token_level_long_text_in_windows(engine, folders) -> None:
    ref = reference(folders["token-40"])
    text = " ".join(TEXTS["deberta"][i % 5] for i in range(12))  # ~150 words, 5+ windows
    edges = _windows(text, 40)
    assert len(edges) >= 5
    for threshold, flat in ((0.3, True), (0.2, False)):
        per_window = ref.inference([text[a:b] for a, b in edges], LABELS, threshold=threshold,
                                   flat_ner=flat)
        moved = [[{**e, "start": e["start"] + a, "end": e["end"] + a} for e in spans]
                 for (a, _), spans in zip(edges, per_window)]
        expected = _merge(moved, edges, flat)
        for e in expected:
            e["text"] = text[e["start"]:e["end"]]
        ours = engine.extract("token-40", [text], LABELS,
                              {"threshold": threshold, "flat_ner": flat})[0][0]["entities"]
        assert len(expected) > 5 and any(e["start"] > edges[1][1] for e in ours)
        same(expected, ours)
