"""SPLADE sparse encoders: a BERT masked-LM head, log(1 + relu(logits)) max-pooled per text."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..runtime.batch import PackedBatch
from ..runtime.device import Placement
from .base import BatchOutputs, EncoderModel, ModelSpec, family

_CHUNK_TOKENS = 2048  # logits are (tokens, vocab): computed a chunk of tokens at a time


@family("splade")
class Splade(EncoderModel):
    output_types = ("sparse",)
    pooling = "splade"  # SIE's name: each vocabulary weight's max over the text's tokens
    templates = True
    length_options = frozenset({"max_seq_length"})

    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        super().__init__(spec, folder, placement)
        w = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v
             for k, v in self.extra_weights.items() if k.startswith("cls.predictions.")}
        needed = ["cls.predictions.transform.dense.weight", "cls.predictions.bias"]
        if any(k not in w for k in needed):
            raise ValueError(f"{folder} has no masked-LM head (cls.predictions.*): not a SPLADE model")
        dev, dt = placement.device, placement.dtype
        self.head = {k.removeprefix("cls.predictions."): v.to(dev, dt) for k, v in w.items()}
        # the decoder is tied to the word embeddings unless the checkpoint carries its own
        self.decoder = self.head.pop("decoder.weight", self.encoder.word.weight)
        self.eps = self.encoder.cfg.layer_norm_eps

    def dims(self) -> dict[str, int]:
        return {"sparse": self.encoder.cfg.vocab_size}

    def heads(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor) -> BatchOutputs:
        h = self.head
        x = F.gelu(F.linear(hidden, h["transform.dense.weight"], h["transform.dense.bias"]))
        x = F.layer_norm(x, x.shape[-1:], h["transform.LayerNorm.weight"],
                         h["transform.LayerNorm.bias"], self.eps)
        seq = self.seq_index(batch)
        pooled = torch.zeros(batch.num_seqs, self.decoder.shape[0], device=hidden.device)
        for start in range(0, x.shape[0], _CHUNK_TOKENS):
            part = slice(start, start + _CHUNK_TOKENS)
            logits = F.linear(x[part], self.decoder, h["bias"]).float()
            weights = torch.log1p(torch.relu(logits))
            index = seq[part].unsqueeze(1).expand_as(weights)
            pooled.scatter_reduce_(0, index, weights, reduce="amax")
        rows, cols = pooled.nonzero(as_tuple=True)  # row-major: grouped by sequence, ids ascending
        counts = torch.bincount(rows, minlength=batch.num_seqs)
        return BatchOutputs(sparse=(cols.int(), pooled[rows, cols], counts))  # syncs: nonzero
