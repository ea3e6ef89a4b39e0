"""Test helpers for LoRA: adapters made with peft, and reference outputs from peft's merged
models computed the FlagEmbedding / sentence-transformers way. Tests only."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COS = 0.99999  # the bar for fp32 on CPU
M3_SPECIAL_IDS = {0, 1, 2, 3}  # <s> <pad> </s> <unk>


def make_adapter(base_dir: Path, out_dir: Path, *, r: int, targets: Any, seed: int,
                 alpha: float | None = None, rslora: bool = False, heads: bool = False,
                 rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                 b_std: float = 0.2, **extra: Any) -> dict[str, Any]:
    """Save a peft LoRA adapter of the model in `base_dir` with random non-zero B matrices to
    `out_dir`; return {"merged": merged model (eval), "heads": head weights or None}."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    base = AutoModel.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = adapt(base, out_dir, r=r, targets=targets, seed=seed, alpha=alpha, b_std=b_std,
                   use_rslora=rslora, rank_pattern=rank_pattern or {},
                   alpha_pattern=alpha_pattern or {}, **extra)
    head_weights = None
    if heads:
        h = base.config.hidden_size
        g = torch.Generator().manual_seed(seed + 1000)
        head_weights = {
            "colbert_linear": {"weight": torch.randn(h, h, generator=g) / h**0.5,
                               "bias": torch.randn(h, generator=g) * 0.02},
            "sparse_linear": {"weight": torch.randn(1, h, generator=g) / h**0.5,
                              "bias": torch.full((1,), 0.1)},
        }
        for name, sd in head_weights.items():
            torch.save(sd, Path(out_dir) / f"{name}.pt")
    return {"merged": merged, "heads": head_weights}


def adapt(module: torch.nn.Module, out_dir: Path, *, r: int, targets: Any, seed: int,
          alpha: float | None = None, b_std: float = 0.2, **extra: Any) -> torch.nn.Module:
    """Wrap `module` (any torch module: a transformers model, a GLiNER model or a part of one)
    with a peft LoRA of random non-zero A and B, save the adapter to `out_dir` and return
    peft's merged module (eval). `module` itself is changed: merged in place."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r,
                        target_modules=targets, lora_dropout=0.0, **extra)
    model = get_peft_model(module, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapter would do nothing
                p.normal_(0.0, b_std)
            elif "lora_A" in name:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    model.save_pretrained(str(out_dir))
    return model.merge_and_unload().eval()


def load_base(base_dir: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(base_dir), dtype=torch.float32).eval()


def tokenize(base_dir: Path, texts: Sequence[str], max_length: int = 512) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    return tok(list(texts), truncation=True, max_length=max_length)["input_ids"]


@torch.no_grad()
def hidden_states(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).last_hidden_state[0].float()


@torch.no_grad()
def m3_reference(model, heads: dict, token_ids: list[list[int]]) -> list[dict[str, Any]]:
    """FlagEmbedding's BGE-M3 outputs (m3.py / modeling.py) from `model`'s hidden states."""
    out = []
    cw, cb = heads["colbert_linear"]["weight"], heads["colbert_linear"]["bias"]
    sw, sb = heads["sparse_linear"]["weight"], heads["sparse_linear"]["bias"]
    for ids in token_ids:
        h = hidden_states(model, ids)
        weights = torch.relu(F.linear(h, sw, sb)).squeeze(-1)
        sparse: dict[int, float] = {}
        for i, w in zip(ids, weights.tolist()):
            if i in M3_SPECIAL_IDS or w <= 0:
                continue
            sparse[i] = max(sparse.get(i, 0.0), w)
        out.append({"dense": F.normalize(h[0], dim=-1).numpy(),
                    "sparse": sparse,
                    "multivector": F.normalize(F.linear(h[1:], cw, cb), dim=-1).numpy()})
    return out


@torch.no_grad()
def mean_pool_reference(model, token_ids: list[list[int]]) -> np.ndarray:
    """all-MiniLM-L6-v2's sentence-transformers pipeline: mean pooling, then L2 norm."""
    return np.stack([F.normalize(hidden_states(model, ids).mean(0), dim=-1).numpy()
                     for ids in token_ids])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def sparse_dict(result) -> dict[int, float]:
    idx, val = result
    return {int(i): float(v) for i, v in zip(idx, val)}


def sparse_cosine(a: dict[int, float], b: dict[int, float]) -> float:
    keys = sorted(set(a) | set(b))
    if not keys:
        return 1.0  # both empty (e.g. every weight <= 0)
    return cosine(np.array([a.get(k, 0.0) for k in keys]), np.array([b.get(k, 0.0) for k in keys]))


def assert_m3_close(got, want: dict[str, Any], what: str) -> None:
    """Engine ItemResult vs a reference dict, for the output types the result holds."""
    if got.dense is not None:
        c = cosine(got.dense, want["dense"])
        assert c >= COS, f"{what}: dense cosine {c}"
    if got.sparse is not None:
        g = sparse_dict(got.sparse)
        c = sparse_cosine(g, want["sparse"])
        assert c >= COS, f"{what}: sparse cosine {c}"
        big = {k for k, v in want["sparse"].items() if v > 1e-3}
        assert big <= set(g), f"{what}: sparse terms missing {sorted(big - set(g))[:5]}"
    if got.multivector is not None:
        m, w = np.asarray(got.multivector), want["multivector"]
        assert m.shape == w.shape, f"{what}: multivector shape {m.shape} != {w.shape}"
        rows = np.sum(m * w, axis=1) / (np.linalg.norm(m, axis=1) * np.linalg.norm(w, axis=1))
        assert rows.min() >= COS, f"{what}: multivector min row cosine {rows.min()}"
