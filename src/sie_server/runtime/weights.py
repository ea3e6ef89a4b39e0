"""Reading a model folder's files: safetensors first, PyTorch pickles only in weights-only
mode, JSON configs; a file that cannot be read raises DamagedFile naming it and the fix."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file


class DamagedFile(ValueError):
    """A model file that is missing, truncated or corrupt; the message names the file, the
    cause and what to do."""

    def __init__(self, path: Path, cause: str) -> None:
        repo = next((p.removeprefix("models--").replace("--", "/") for p in path.parts
                     if p.startswith("models--")), None)
        again = (f"download it again (huggingface-cli download {repo} --force-download)"
                 if repo else "copy or download the model again")
        super().__init__(f"{path} cannot be read: {cause}. The file is damaged or incomplete "
                         f"(an interrupted download or copy?): {again}, or serve an intact copy "
                         "with --model NAME=/path/to/folder")
        self.path = path


def _cause(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "the file is missing"
    if isinstance(exc, KeyError):
        return f"it has no {exc} entry"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return first if type(exc) is Exception else f"{type(exc).__name__}: {first}"


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Any error raised while parsing `path` becomes DamagedFile(path, cause)."""
    try:
        yield
    except DamagedFile:
        raise
    except Exception as exc:  # noqa: BLE001 - parsers raise many types; the advice is the same
        raise DamagedFile(path, _cause(exc)) from exc


def read_json(path: Path) -> Any:
    """A JSON file of a model folder."""
    with reading(path):
        return json.loads(path.read_text())


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's safetensors weights: the shards its model.safetensors.index.json lists
    (DamagedFile when one is missing), else model*.safetensors."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return sorted(folder.glob("model*.safetensors"))
    with reading(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
    for shard in shards:
        if not (folder / shard).is_file():
            raise DamagedFile(folder / shard, f"the file is missing ({index.name} lists it)")
    return [folder / shard for shard in shards]


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder (model.safetensors, sharded or not, or .bin)."""
    files = safetensors_files(folder)
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            with reading(f):
                sd.update(load_file(str(f)))
        return sd
    binary = folder / "pytorch_model.bin"
    if binary.exists():
        with reading(binary):
            return load_torch_file(binary)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict (BGE-M3 heads, pytorch_model.bin), loaded without executing
    pickled code."""
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
        with reading(f), safe_open(str(f), "pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                numel += n
    return numel * size
