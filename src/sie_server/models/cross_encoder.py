"""Cross-encoders (rerankers): query and item go through the encoder together as one pair and
a classification head turns the first token into one relevance logit.

Two checkpoint layouts, as Hugging Face's *ForSequenceClassification saves them:
- BERT (`BertForSequenceClassification`, e.g. the ms-marco MiniLM rerankers): pooler
  (dense + tanh on [CLS]), then `classifier` (Linear hidden -> 1);
- XLM-R / RoBERTa (`XLMRobertaForSequenceClassification`, e.g. bge-reranker-v2-m3):
  `classifier.dense` + tanh + `classifier.out_proj` on `<s>`.
Pairs use the tokenizer's own pair template (`[CLS] q [SEP] d [SEP]` with token types 0/1 for
BERT, `<s> q </s></s> d </s>` for XLM-R); truncation cuts the item, never the query.
The heads return raw logits; the engine applies the activation (sigmoid or none) that the
request, the catalog or the model's sentence-transformers config asks for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InvalidRequest
from ..runtime.batch import PackedBatch
from ..runtime.device import Placement
from ..runtime.tokenizer import Tokenized
from .base import BatchOutputs, EncoderModel, ModelSpec, family

ACTIVATIONS = ("sigmoid", "none")


def config_activation(config: dict) -> str:
    """The activation a checkpoint's config asks for: sentence-transformers' CrossEncoder writes
    `sbert_ce_default_activation_function` (v2/v3) or `sentence_transformers.activation_fn`
    (v4+); without either the raw logit is the score (Hugging Face / FlagEmbedding)."""
    name = config.get("sbert_ce_default_activation_function") or \
        (config.get("sentence_transformers") or {}).get("activation_fn") or ""
    return "sigmoid" if name.rsplit(".", 1)[-1] == "Sigmoid" else "none"


@family("cross-encoder")
class CrossEncoder(EncoderModel):
    length_options = frozenset({"max_seq_length"})  # per pair, as SIE's cross-encoders
    output_types = ()  # does not encode
    score_types = ("relevance",)
    pair_scoring = True

    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        super().__init__(spec, folder, placement)
        config = json.loads((folder / "config.json").read_text())
        w = self.extra_weights
        if "classifier.out_proj.weight" in w:  # RoBERTa-style head
            pre, out = "classifier.dense", "classifier.out_proj"
        elif "classifier.weight" in w:  # BERT-style: pooler + classifier
            pre = next((p for p in ("bert.pooler.dense", "pooler.dense", "roberta.pooler.dense")
                        if f"{p}.weight" in w), None)
            if pre is None:
                raise ValueError(f"{folder}: classifier found but no pooler.dense weights")
            out = "classifier"
        else:
            raise ValueError(f"{folder}: no sequence-classification head (classifier.*) in the "
                             "weights; a cross-encoder needs one")
        dev = placement.device  # the small head runs in float32 whatever the encoder's dtype
        self.pre_w, self.pre_b = (w[f"{pre}.{p}"].to(dev, torch.float32) for p in ("weight", "bias"))
        self.out_w, self.out_b = (w[f"{out}.{p}"].to(dev, torch.float32) for p in ("weight", "bias"))
        if self.out_w.shape[0] != 1:
            raise ValueError(f"{folder}: the classifier has {self.out_w.shape[0]} labels; only "
                             "one-logit rerankers are supported")
        self.default_activation = spec.score_activation or config_activation(config)
        if self.default_activation not in ACTIVATIONS:
            raise ValueError(f"{spec.name}: score_activation must be one of {ACTIVATIONS}")
        # models with one token type (XLM-R) get all zeros, as their Hugging Face tokenizer gives
        self.use_token_types = self.encoder.cfg.type_vocab_size > 1

    def dims(self) -> dict[str, int]:
        return {}

    def prepare_pairs(self, query: str, texts: list[str], instruction: str | None = None,
                      limit: int | None = None) -> tuple[int, Tokenized]:
        """(tokens the query takes with the pair's special tokens, the tokenized pairs, cut
        at `limit` tokens where that is below the model's limit)."""
        if instruction is not None:
            raise InvalidRequest(f"options.instruction: {self.spec.name} (cross-encoder) takes "
                                 "no instruction")
        fixed, tok = self.tokenizer.limited(limit).encode_pairs(query, texts)
        if not self.use_token_types:
            tok = Tokenized(tok.ids, tok.original_lengths)
        return fixed, tok

    def heads(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor) -> BatchOutputs:
        x = torch.tanh(F.linear(hidden[self.first_tokens(batch)].float(), self.pre_w, self.pre_b))
        return BatchOutputs(scores=F.linear(x, self.out_w, self.out_b)[:, 0])
