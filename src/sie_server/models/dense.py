"""Sentence-transformers dense models (BERT / XLM-R): Transformer -> Pooling -> Normalize,
configured from modules.json, 1_Pooling/config.json and sentence_bert_config.json."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ..runtime.batch import PackedBatch
from ..runtime.device import Placement
from ..runtime.weights import read_json, reading
from .base import BatchOutputs, EncoderModel, ModelSpec, family

_KNOWN_MODULES = {"Transformer", "Pooling", "Normalize"}
_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "lasttoken")
# a request's pooling (PackedBatch.pooling_rows) -> sentence-transformers' name for it
_MODES = {"cls": "cls_token", "mean": "mean_tokens", "last_token": "lasttoken"}


def read_pipeline(folder: Path) -> tuple[str, bool, int | None]:
    """(pooling mode, normalize, max_seq_length) from the sentence-transformers config files."""
    path = folder / "modules.json"
    with reading(path):
        modules = json.loads(path.read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        pool = next((m["path"] for m in modules if m["type"].endswith("Pooling")), None)
    unknown = [k for k in kinds if k not in _KNOWN_MODULES]
    if unknown:
        raise ValueError(f"{folder}/modules.json uses modules not supported yet: {unknown}")
    pooling = "cls_token"
    if pool is not None:
        cfg = read_json(folder / pool / "config.json")
        modes = [m for m in _POOLING_MODES if cfg.get(f"pooling_mode_{m}")]
        if len(modes) != 1:
            raise ValueError(f"{folder}: exactly one pooling mode is supported, found {modes}")
        pooling = modes[0]
    sbert = folder / "sentence_bert_config.json"
    max_len = read_json(sbert).get("max_seq_length") if sbert.exists() else None
    return pooling, "Normalize" in kinds, max_len


@family("sentence-transformers")
class SentenceTransformer(EncoderModel):
    output_types = ("dense",)
    raw_vectors = True
    templates = True
    poolings = True

    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        self.pooling, self.normalize, max_len = read_pipeline(folder)
        if spec.max_input_tokens is None and max_len:
            spec = replace(spec, max_input_tokens=max_len)
        super().__init__(spec, folder, placement)

    def dims(self) -> dict[str, int]:
        return {"dense": self.encoder.cfg.hidden_size}

    def heads(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor) -> BatchOutputs:
        hidden = hidden.float()
        pooled = self._pool(self.pooling, batch, hidden)
        for mode, rows in (batch.pooling_rows or {}).items():
            at = torch.from_numpy(rows).to(hidden.device)
            pooled[at] = self._pool(_MODES[mode], batch, hidden)[at]
        return BatchOutputs(dense=self.l2(batch, pooled) if self.normalize else pooled)

    def _pool(self, mode: str, batch: PackedBatch, hidden: torch.Tensor) -> torch.Tensor:
        """Every sequence's vector by `mode` (sentence-transformers' pooling names)."""
        cu = torch.from_numpy(batch.cu_seqlens).to(hidden.device)
        if mode == "cls_token":
            return hidden[cu[:-1]]
        if mode == "lasttoken":
            return hidden[cu[1:] - 1]
        seq = self.seq_index(batch)
        shape = (batch.num_seqs, hidden.shape[1])
        if mode == "mean_tokens":
            sums = torch.zeros(shape, device=hidden.device).index_add_(0, seq, hidden)
            return sums / (cu[1:] - cu[:-1]).unsqueeze(1)
        return torch.full(shape, float("-inf"), device=hidden.device).index_reduce_(
            0, seq, hidden, "amax")
