"""Reference encode loops the engine is compared with, on plain transformers / sentence-transformers.

Written against APIs that exist in transformers 4.57 and 5.x and sentence-transformers 5.7
and 6.x; FlagEmbedding is NOT imported (it does not import on transformers 5): its BGE-M3
`encode` loop is reproduced step by step instead.

- ``naive``: what a user writes first: texts in corpus order, batches of 32, padded to the
  longest in the batch, the model's outputs computed with torch ops and copied to the host.
- ``flag``: FlagEmbedding 1.4.2 ``M3Embedder.encode_single_device``: tokenize everything
  without padding (chunks of the batch size), sort by length (longest first), pad each batch
  of 256, forward, then per batch: dense (CLS, normalised) to host; sparse as FlagEmbedding's
  Python per-token dict (``_process_token_weights``: str(id) -> max relu weight, cls / eos /
  pad / unk dropped); ColBERT as ``colbert_linear(h[:, 1:]) * mask`` (fp32, as its
  ``.float()`` mask makes it), normalised, copied to the host and sliced per text. Not timed:
  its probe forward of the first batch that picks the batch size (done in warm-up instead).
  For a sentence-transformers model the same loop runs with the model's own pooling.
- ``st``: ``SentenceTransformer.encode(batch_size=32)`` (sorts by length itself).

fp16 on GPU (FlagEmbedding's default), fp32 on CPU. Tokenization is inside the timed region,
as it is for the engine.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class RefModel:
    kind: str  # "bge-m3" | "st"
    folder: Path
    device: torch.device
    dtype: torch.dtype
    max_length: int
    tokenizer: Any
    model: Any
    pooling: str = "cls"  # st: mean | cls
    normalize: bool = True
    colbert: torch.nn.Linear | None = None
    sparse: torch.nn.Linear | None = None
    unused_ids: set = field(default_factory=set)

    @property
    def info(self) -> dict:
        return {"dtype": str(self.dtype).removeprefix("torch."), "max_length": self.max_length,
                "attn_implementation": getattr(self.model.config, "_attn_implementation", None)}


def _st_pipeline(folder: Path) -> tuple[str, bool, int | None]:
    modules = json.loads((folder / "modules.json").read_text())
    pooling, normalize = "cls", any(m["type"].endswith("Normalize") for m in modules)
    for m in modules:
        if m["type"].endswith("Pooling"):
            cfg = json.loads((folder / m["path"] / "config.json").read_text())
            pooling = "mean" if cfg.get("pooling_mode_mean_tokens") else "cls"
    sbert = folder / "sentence_bert_config.json"
    max_len = json.loads(sbert.read_text()).get("max_seq_length") if sbert.exists() else None
    return pooling, normalize, max_len


def _linear(path: Path, device, dtype) -> torch.nn.Linear:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    out_f, in_f = sd["weight"].shape
    lin = torch.nn.Linear(in_f, out_f)
    lin.load_state_dict(sd)
    return lin.to(device, dtype).eval()


def quiet_transformers() -> None:
    """No progress bars or advice in the benchmark's log."""
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def load(folder: Path, device: str, dtype: torch.dtype | None = None) -> RefModel:
    """The HF model, tokenizer and heads of `folder` (fp16 on CUDA, fp32 on CPU by default)."""
    from transformers import AutoModel, AutoTokenizer

    quiet_transformers()
    folder = Path(folder)
    dev = torch.device(device)
    dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).to(dev, dtype).eval()
    cfg = json.loads((folder / "config.json").read_text())
    roberta = cfg.get("model_type") in ("xlm-roberta", "roberta")
    limit = cfg["max_position_embeddings"] - (cfg.get("pad_token_id", 1) + 1 if roberta else 0)
    if (folder / "colbert_linear.pt").exists():
        ids = {getattr(tok, f"{t}_token_id", None) for t in ("cls", "eos", "pad", "unk")}
        return RefModel("bge-m3", folder, dev, dtype, limit, tok, model,
                        colbert=_linear(folder / "colbert_linear.pt", dev, dtype),
                        sparse=_linear(folder / "sparse_linear.pt", dev, dtype),
                        unused_ids={i for i in ids if i is not None})
    pooling, normalize, max_len = _st_pipeline(folder)
    return RefModel("st", folder, dev, dtype, min(max_len or limit, limit), tok, model,
                    pooling=pooling, normalize=normalize)


@dataclass
class RefRun:
    seconds: float
    texts: int
    tokens: int
    dense: np.ndarray | None = None  # first `keep` dense vectors, float32
    postprocess_s: float = 0.0
    batch_size: int = 0

    def summary(self, **extra) -> dict:
        out = {"tokens_per_s": round(self.tokens / self.seconds, 1),
               "texts_per_s": round(self.texts / self.seconds, 2),
               "wall_s": round(self.seconds, 4), "texts": self.texts, "tokens": self.tokens,
               "batch_size": self.batch_size}
        if self.postprocess_s:
            out["python_postprocess_s"] = round(self.postprocess_s, 4)
        out.update(extra)
        return out


def _pool(ref: RefModel, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if ref.kind == "st" and ref.pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    else:
        pooled = hidden[:, 0]
    return F.normalize(pooled, dim=-1) if ref.normalize else pooled


@torch.inference_mode()
def naive(ref: RefModel, texts: list[str], outputs: list[str], batch_size: int = 32,
          keep: int = 0) -> RefRun:
    """Corpus order, fixed batches, padded; every asked-for output copied to the host."""
    started = time.perf_counter()
    tokens, kept = 0, []
    for i in range(0, len(texts), batch_size):
        enc = ref.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                            max_length=ref.max_length, return_tensors="pt").to(ref.device)
        mask = enc["attention_mask"]
        tokens += int(mask.sum())
        hidden = ref.model(**enc).last_hidden_state
        dense = _pool(ref, hidden, mask).float().cpu().numpy()
        if len(kept) * batch_size < keep:
            kept.append(dense)
        if ref.kind == "bge-m3":
            if "sparse" in outputs:
                torch.relu(ref.sparse(hidden)).squeeze(-1).float().cpu().numpy()
            if "multivector" in outputs:
                vecs = ref.colbert(hidden[:, 1:]) * mask[:, 1:, None]
                F.normalize(vecs.float(), dim=-1).cpu().numpy()
    seconds = time.perf_counter() - started
    dense = np.concatenate(kept)[:keep] if keep else None
    return RefRun(seconds, len(texts), tokens, dense, batch_size=batch_size)


def _pad(tokenizer, examples: list[Mapping]) -> Any:
    """FlagEmbedding's pad_with_compat: list of mappings -> mapping of lists -> tokenizer.pad."""
    batch = {k: [e[k] for e in examples] for k in examples[0].keys()}
    return tokenizer.pad(batch, padding=True, return_tensors="pt")


@torch.inference_mode()
def flag(ref: RefModel, texts: list[str], outputs: list[str], batch_size: int = 256) -> RefRun:
    """FlagEmbedding's encode loop (see the module docstring)."""
    started = time.perf_counter()
    post = 0.0
    unused = ref.unused_ids

    def process_token_weights(token_weights: np.ndarray, input_ids: list) -> dict:
        result = defaultdict(int)
        for w, idx in zip(token_weights, input_ids):
            if idx not in unused and w > 0:
                idx = str(idx)
                if w > result[idx]:
                    result[idx] = w
        return result

    all_inputs = []
    for i in range(0, len(texts), batch_size):
        enc = ref.tokenizer(texts[i:i + batch_size], truncation=True, max_length=ref.max_length)
        all_inputs.extend({k: enc[k][j] for k in enc.keys()} for j in range(len(enc["input_ids"])))
    order = np.argsort([-len(x["input_ids"]) for x in all_inputs])
    sorted_inputs = [all_inputs[i] for i in order]
    dense_all, lexical, colbert = [], [], []
    tokens = 0
    for i in range(0, len(sorted_inputs), batch_size):
        batch = _pad(ref.tokenizer, sorted_inputs[i:i + batch_size]).to(ref.device)
        mask = batch["attention_mask"]
        tokens += int(mask.sum())
        hidden = ref.model(**batch).last_hidden_state
        dense = _pool(ref, hidden, mask)
        dense_all.append(dense.cpu().float().numpy() if dense.dtype == torch.bfloat16
                         else dense.cpu().numpy())
        if ref.kind != "bge-m3":
            continue
        if "sparse" in outputs:
            weights = torch.relu(ref.sparse(hidden)).squeeze(-1).cpu().numpy()
            ids = batch["input_ids"].cpu().numpy().tolist()
            t0 = time.perf_counter()
            lexical.extend(map(process_token_weights, weights, ids))
            post += time.perf_counter() - t0
        if "multivector" in outputs:
            vecs = ref.colbert(hidden[:, 1:]) * mask[:, 1:][:, :, None].float()
            vecs = F.normalize(vecs, dim=-1).cpu().numpy()
            masks = mask.cpu().numpy()
            colbert.extend(v[: int(np.sum(m)) - 1] for v, m in zip(vecs, masks))
    inverse = np.argsort(order)
    dense_all = np.concatenate(dense_all)[inverse]
    if lexical:
        lexical = [lexical[i] for i in inverse]
    if colbert:
        colbert = [colbert[i] for i in inverse]
    seconds = time.perf_counter() - started
    return RefRun(seconds, len(texts), tokens, postprocess_s=post, batch_size=batch_size)


@torch.inference_mode()
def flag_probe_batch_size(ref: RefModel, texts: list[str], outputs: list[str],
                          batch_size: int = 256) -> int:
    """FlagEmbedding's start-up probe: run the longest batch, shrink to 3/4 on OOM."""
    longest = sorted(texts, key=len, reverse=True)
    while batch_size > 1:
        try:
            flag(ref, longest[:batch_size], outputs, batch_size)
            return batch_size
        except torch.OutOfMemoryError:
            if ref.device.type == "cuda":
                torch.cuda.empty_cache()
            batch_size = batch_size * 3 // 4
    return max(batch_size, 1)


def st_load(folder: Path, device: str):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device=device)
    if torch.device(device).type == "cuda":
        model.half()
    return model


def st_encode(model, texts: list[str], tokens: int, batch_size: int = 32) -> RefRun:
    started = time.perf_counter()
    model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    return RefRun(time.perf_counter() - started, len(texts), tokens, batch_size=batch_size)


def st_vectors(model, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """sentence-transformers' dense vectors (float32), untimed: the agreement reference."""
    return np.asarray(model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                   show_progress_bar=False), dtype=np.float32)
