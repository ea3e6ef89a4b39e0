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

from pathlib import Path

import pytest
from make_gliner_test_models import build
from test_gliner import LABELS, TEXTS, check_windows, reference, same, windows_of_40

from sie_server.models.gliner import merge_adjacent

NUNER = "numind/NuNER_Zero"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gliner-token")
    out = {"token": build(root / "token", "deberta", seed=2, span_mode="token_level"),
           NUNER: build(root / "nuner", "deberta", seed=3, span_mode="marker", max_width=1)}
    out["token-40"] = windows_of_40(out["token"], root / "token-40")
    return out


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
    check_windows(engine, "token-40", folders["token-40"], ((0.3, True), (0.2, False)))
