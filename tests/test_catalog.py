"""The catalog: every entry names a family that exists; operator files override the repo's."""

from __future__ import annotations

from pathlib import Path

import pytest

from sie_server.engine.catalog import detect_family, load_catalog
from sie_server.models import FAMILIES


def test_builtin_catalog_entries_are_servable() -> None:
    specs, defaults = load_catalog([])
    assert defaults == ["sentence-transformers/all-MiniLM-L6-v2"]
    families = {s.family for s in specs.values()}
    assert families <= set(FAMILIES)
    assert {"bge-m3", "sentence-transformers", "splade", "cross-encoder"} <= families
    assert specs["intfloat/multilingual-e5-small"].query_prefix == "query: "


def test_operator_file_overrides_and_extends(tmp_path: Path) -> None:
    extra = tmp_path / "mine.yaml"
    extra.write_text("default_models: [mine]\nmodels:\n  mine:\n    family: splade\n"
                     "    source: /models/mine\n  BAAI/bge-m3:\n    family: bge-m3\n"
                     "    source: /models/m3\n    pinned: true\n")
    specs, defaults = load_catalog([extra])
    assert defaults == ["mine"] and specs["mine"].family == "splade"
    assert specs["BAAI/bge-m3"].source == "/models/m3" and specs["BAAI/bge-m3"].pinned


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  x:\n    family: splade\n    source: /x\n    colour: red\n")
    with pytest.raises(ValueError, match="colour"):
        load_catalog([bad])


def test_family_detection(bge_m3_dir: Path, minilm_dir: Path) -> None:
    assert detect_family(str(bge_m3_dir)) == "bge-m3"
    assert detect_family(str(minilm_dir)) == "sentence-transformers"
