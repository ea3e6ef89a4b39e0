"""ModernBERT families: the runtime's ModernBERT encoder under the sentence-transformers dense
pipeline (gte-modernbert, modernbert-embed) and under a ModernBERT cross-encoder head
(gte-reranker-modernbert).

- `modernbert`: Transformer -> Pooling -> Normalize from modules.json as `sentence-transformers`
  (CLS for gte-modernbert-base, mean for modernbert-embed-base); query / document prompts from
  the catalog, else from `prompts` in config_sentence_transformers.json ("query", and
  "document" / "passage" / "corpus").
- `modernbert-cross-encoder`: `ModernBertForSequenceClassification`: the pair's tokens pooled
  as `classifier_pooling` says (the first token, or the mean of all), then
  `head.norm(act(head.dense(x)))` and `classifier` (one logit). No token types.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..runtime.batch import PackedBatch
from ..runtime.device import Placement
from ..runtime.encoder import _ACTIVATIONS
from ..runtime.modernbert import LayerAttention, ModernBertEncoder
from .base import BatchOutputs, EncoderModel, ModelSpec, family
from .cross_encoder import ACTIVATIONS, CrossEncoder, config_activation
from .dense import SentenceTransformer

_DOCUMENT_PROMPTS = ("document", "passage", "corpus")


class _ModernBertEncoded:
    """What every ModernBERT family shares: the encoder and its two attentions per batch."""

    stack = ModernBertEncoder

    def attention(self, batch: PackedBatch) -> LayerAttention:
        return self.encoder.attention(batch.cu_seqlens, self.placement.device,
                                      self.placement.dtype)


def st_prompts(folder: Path) -> dict[str, str]:
    """query_prefix / document_prefix from config_sentence_transformers.json's `prompts`."""
    path = folder / "config_sentence_transformers.json"
    prompts = (json.loads(path.read_text()).get("prompts") or {}) if path.exists() else {}
    out = {"query_prefix": prompts.get("query", "")}
    out["document_prefix"] = next((prompts[k] for k in _DOCUMENT_PROMPTS if k in prompts), "")
    return {k: v for k, v in out.items() if v}


@family("modernbert")
class ModernBertSentenceTransformer(_ModernBertEncoded, SentenceTransformer):
    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        if not spec.query_prefix and not spec.document_prefix:
            spec = replace(spec, **st_prompts(folder))
        super().__init__(spec, folder, placement)


@family("modernbert-cross-encoder")
class ModernBertCrossEncoder(_ModernBertEncoded, CrossEncoder):
    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        EncoderModel.__init__(self, spec, folder, placement)  # the BERT head loader does not apply
        config = json.loads((folder / "config.json").read_text())
        w = self.extra_weights
        for name in ("head.dense.weight", "head.norm.weight", "classifier.weight"):
            if name not in w:
                raise ValueError(f"{folder}: no {name} in the weights; a ModernBERT cross-encoder "
                                 "is a ModernBertForSequenceClassification checkpoint")

        def head(name: str) -> torch.Tensor | None:  # float32, whatever the encoder's dtype
            return w[name].to(placement.device, torch.float32) if name in w else None

        self.dense_w, self.dense_b = head("head.dense.weight"), head("head.dense.bias")
        self.norm_w, self.norm_b = head("head.norm.weight"), head("head.norm.bias")
        self.out_w, self.out_b = head("classifier.weight"), head("classifier.bias")
        if self.out_w.shape[0] != 1:
            raise ValueError(f"{folder}: the classifier has {self.out_w.shape[0]} labels; only "
                             "one-logit rerankers are supported")
        self.pooling = config.get("classifier_pooling", "cls")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"{folder}: classifier_pooling {self.pooling!r} is not cls or mean")
        self.act = _ACTIVATIONS[config.get("classifier_activation", "gelu")]
        self.norm_eps = self.encoder.cfg.norm_eps
        self.default_activation = spec.score_activation or config_activation(config)
        if self.default_activation not in ACTIVATIONS:
            raise ValueError(f"{spec.name}: score_activation must be one of {ACTIVATIONS}")
        self.use_token_types = False

    def heads(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor) -> BatchOutputs:
        hidden = hidden.float()
        if self.pooling == "cls":
            x = hidden[self.first_tokens(batch)]
        else:
            sums = hidden.new_zeros(batch.num_seqs, hidden.shape[1]).index_add_(
                0, self.seq_index(batch), hidden)
            x = sums / torch.from_numpy(batch.lengths).to(hidden.device).unsqueeze(1)
        x = self.act(F.linear(x, self.dense_w, self.dense_b))
        x = F.layer_norm(x, x.shape[-1:], self.norm_w, self.norm_b, self.norm_eps)
        return BatchOutputs(scores=F.linear(x, self.out_w, self.out_b)[:, 0])
