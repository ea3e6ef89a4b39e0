"""Reading weight files: safetensors first, PyTorch pickles only in weights-only mode."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files: the shards model.safetensors.index.json names (when present, so stale
    files beside them are ignored), else every model*.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: {index.name} names shards that are missing: "
                                    f"{', '.join(missing[:3])}")
        return [folder / n for n in names]
    return sorted(folder.glob("model*.safetensors"))


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder (model.safetensors, sharded or not, or .bin)."""
    files = safetensors_files(folder)
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    binary = folder / "pytorch_model.bin"
    if binary.exists():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A small .pt state dict (BGE-M3 heads), loaded without executing pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def estimate_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Memory the folder's weights take once loaded in `dtype` (from headers, not data)."""
    size = torch.tensor([], dtype=dtype).element_size()
    files = safetensors_files(folder)
    if not files:
        binary = folder / "pytorch_model.bin"
        return binary.stat().st_size * size // 4 if binary.exists() else 0
    numel = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                numel += n
    return numel * size
