"""The model catalog: the repo's catalog.yaml, then operator files, then --model flags."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from ..errors import InvalidRequest
from ..models.base import ModelSpec
from ..muvera import MuveraConfig
from ..runtime.decoder import MODEL_TYPES as DECODER_TYPES
from ..runtime.weights import DamagedFile, read_json
from .profiles import parse_profiles
from .sources import package_folder

BUILTIN = Path(__file__).resolve().parent.parent / "catalog.yaml"
_SPEC_FIELDS = {f.name for f in fields(ModelSpec)} - {"name"}


def load_catalog(files: list[Path]) -> tuple[dict[str, ModelSpec], list[str]]:
    """Specs by name and the default model list; later files override earlier ones."""
    specs: dict[str, ModelSpec] = {}
    defaults: list[str] = []
    for path in [BUILTIN, *files]:
        doc = yaml.safe_load(Path(path).read_text()) or {}
        defaults = doc.get("default_models", defaults)
        for name, entry in (doc.get("models") or {}).items():
            unknown = set(entry) - _SPEC_FIELDS
            if unknown:
                raise ValueError(f"{path}: model {name} has unknown keys {sorted(unknown)}")
            if entry.get("muvera") is not None:
                try:
                    MuveraConfig.parse(entry["muvera"], "muvera")
                except InvalidRequest as e:
                    raise ValueError(f"{path}: model {name}: {e}") from None
            if "output_types" in entry:
                entry = {**entry, "output_types": tuple(entry["output_types"])}
            try:
                entry = {**entry, "profiles": parse_profiles(name, entry.get("profiles"))}
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
            specs[name] = ModelSpec(name=name, **entry)
    return specs, defaults


def spec_for_source(name: str, source: str, known: ModelSpec | None) -> ModelSpec:
    """A --model NAME=SOURCE flag: keep the catalog's settings for NAME, or detect the family."""
    if known is not None:
        return ModelSpec(**{**known.__dict__, "source": source})
    return ModelSpec(name=name, family=detect_family(source), source=source)


def _has_dense_projection(folder: Path) -> bool:
    """A PyLate (ColBERT) folder: a Dense module and no Pooling in modules.json."""
    try:
        modules = read_json(folder / "modules.json") if (folder / "modules.json").exists() else []
    except DamagedFile:
        return False
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)}
    return "Dense" in kinds and "Pooling" not in kinds


def detect_family(source: str) -> str:
    """Guess a local folder's family from its files."""
    folder = package_folder(source) if source.startswith("package:") else Path(source).expanduser()
    if (folder / "colbert_linear.pt").exists() or (folder / "sparse_linear.pt").exists():
        return "bge-m3"
    if (folder / "gliner_config.json").exists():
        return "gliner"
    config = folder / "config.json"
    try:
        cfg = read_json(config) if config.exists() else {}
    except DamagedFile:
        cfg = {}  # loading it will refuse the damaged file by name
    arch = " ".join(cfg.get("architectures") or [])
    if cfg.get("model_type") == "GLiClass":
        return "gliclass"
    if cfg.get("model_type") in ("clip", "siglip"):  # CLIPModel / SiglipModel: both towers
        return cfg["model_type"]
    if cfg.get("model_type") in DECODER_TYPES:  # decoders: embedders have an ST pipeline
        return "decoder-embedder" if (folder / "modules.json").exists() else "llm-reranker"
    if "HF_ColBERT" in arch or _has_dense_projection(folder):
        return "colbert"
    if cfg.get("model_type") == "modernbert":
        return "modernbert-cross-encoder" if "ForSequenceClassification" in arch else "modernbert"
    if (folder / "modules.json").exists():
        return "sentence-transformers"
    if config.exists():
        if "ForSequenceClassification" in arch and any(
                str(v).lower().startswith("entail") for v in (cfg.get("id2label") or {}).values()):
            return "nli-zero-shot"
        if "ForSequenceClassification" in arch:
            return "cross-encoder"
        if "ForMaskedLM" in arch:
            return "splade"
    return "sentence-transformers"
