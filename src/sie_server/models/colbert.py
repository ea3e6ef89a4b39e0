"""ColBERT (late interaction): one L2-normalised vector per token, compared by MaxSim.

Two checkpoint layouts, read as their reference libraries read them:
- PyLate (`modules.json` with `Dense` modules after the Transformer): the projection is the
  chain of Dense layers (identity activations), settings from config_sentence_transformers.json
  (`query_prefix` / `document_prefix` marker tokens, default "[Q] " / "[D] "; `query_length` 32,
  `document_length` 180; `do_query_expansion` true; `attend_to_expansion_tokens` false;
  `skiplist_words`, default the ASCII punctuation);
- Stanford colbert-ai (`HF_ColBERT`: BERT weights under `bert.` and a bias-free `linear`),
  settings from artifact.metadata (`query_token_id` "[unused0]", `doc_token_id` "[unused1]",
  `query_maxlen` 32, `doc_maxlen` 220, `attend_to_mask_tokens` false, `mask_punctuation` true).

Both: the marker token goes right after the first token (`[CLS]`), within the length limit. A
query is padded to its length with the mask token (query expansion), and when expansion
tokens are not attended they still get vectors, but no token attends to them. Every query
vector is kept; a document drops the vectors of skiplist (punctuation) tokens. The encoder is
BERT / XLM-R or ModernBERT, as config.json says. The catalog may set `query_max_tokens`,
`max_input_tokens` (documents) and `query_expansion` over the checkpoint's own.
"""

from __future__ import annotations

import copy
import string
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime.attention import make_attention
from ..runtime.batch import PackedBatch
from ..runtime.device import Placement
from ..runtime.modernbert import ModernBertEncoder
from ..runtime.tokenizer import Tokenized
from ..runtime.weights import load_state_dict, read_json
from .base import BatchOutputs, EncoderModel, ModelInfo, ModelSpec, family

_IDENTITY = ("torch.nn.modules.linear.Identity", "torch.nn.Identity")


def _dense_modules(folder: Path) -> list[str] | None:
    """The folders of the Dense modules in modules.json (PyLate layout), else None."""
    path = folder / "modules.json"
    if not path.exists():
        return None
    modules = read_json(path)
    dense = [m["path"] for m in modules if m["type"].rsplit(".", 1)[-1] == "Dense"]
    return dense or None


def read_settings(folder: Path) -> dict:
    """The layout's settings, with the reference library's defaults."""
    if _dense_modules(folder) is not None:
        path = folder / "config_sentence_transformers.json"
        c = read_json(path) if path.exists() else {}
        pick = lambda key, default: default if c.get(key) is None else c[key]  # noqa: E731
        expansion = pick("do_query_expansion", True)
        return {"layout": "pylate", "query_marker": pick("query_prefix", "[Q] "),
                "document_marker": pick("document_prefix", "[D] "),
                "query_length": pick("query_length", 32),
                "document_length": pick("document_length", 180),
                "expansion": expansion,
                "attend_expansion": expansion and pick("attend_to_expansion_tokens", False),
                "skiplist": pick("skiplist_words", list(string.punctuation))}
    path = folder / "artifact.metadata"
    m = read_json(path) if path.exists() else {}
    return {"layout": "stanford", "query_marker": m.get("query_token_id", "[unused0]"),
            "document_marker": m.get("doc_token_id", "[unused1]"),
            "query_length": m.get("query_maxlen", 32), "document_length": m.get("doc_maxlen", 220),
            "expansion": True, "attend_expansion": m.get("attend_to_mask_tokens", False),
            "skiplist": list(string.punctuation) if m.get("mask_punctuation", True) else []}


def _projection(folder: Path) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """PyLate's Dense layers, in order, as (weight, bias)."""
    layers = []
    for sub in _dense_modules(folder) or []:
        cfg = read_json(folder / sub / "config.json")
        act = cfg.get("activation_function", _IDENTITY[0])
        if act not in _IDENTITY:
            raise ValueError(f"{folder / sub}: activation {act!r} is not supported (identity only)")
        sd = load_state_dict(folder / sub)
        layers.append((sd["linear.weight"], sd.get("linear.bias")))
    return layers


@family("colbert")
class ColBERT(EncoderModel):
    output_types = ("multivector",)
    score_types = ("colbert",)  # MaxSim (SIE's score mode name), engine/scoring.py
    length_options = frozenset({"max_seq_length", "query_max_length"})

    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        s = read_settings(folder)
        if read_json(folder / "config.json").get("model_type") == "modernbert":
            self.stack = ModernBertEncoder
        spec = replace(spec, max_input_tokens=spec.max_input_tokens or s["document_length"])
        super().__init__(spec, folder, placement)
        if s["layout"] == "pylate":
            layers = _projection(folder)
        else:
            w = self.extra_weights.get("linear.weight")
            if w is None:
                raise ValueError(f"{folder}: no linear.weight; a Stanford ColBERT checkpoint "
                                 "(HF_ColBERT) carries its projection as `linear`")
            layers = [(w, None)]
        dev, dt = placement.device, placement.dtype
        self.projection = [(w.to(dev, dt), None if b is None else b.to(dev, dt))
                           for w, b in layers]
        tok = self.tokenizer
        markers = [tok.token_id(s[k]) for k in ("query_marker", "document_marker")]
        for key, mid in zip(("query_marker", "document_marker"), markers):
            if mid is None:
                raise ValueError(f"{folder}: the tokenizer has no marker token {s[key]!r}")
        self.query_marker, self.document_marker = markers
        if self.query_marker == self.document_marker:
            raise ValueError(f"{folder}: the query and document markers are the same token")
        self.expansion = s["expansion"] if spec.query_expansion is None else spec.query_expansion
        self.attend_expansion = s["attend_expansion"] and self.expansion
        self.mask_id = self._mask_token(folder) if self.expansion else None
        unk = self._unk_token(folder)
        skip = {tok.token_id(w) for w in s["skiplist"]}
        if s["layout"] == "pylate":  # convert_tokens_to_ids: an unknown word is [UNK]
            skip = {unk if i is None else i for i in skip}
        self.skip_ids = np.array(sorted(i for i in skip if i is not None), dtype=np.int64)
        query_len = min(spec.query_max_tokens or s["query_length"], self.max_tokens)
        if min(query_len, self.max_tokens) < 3:  # [CLS] marker [SEP] at the least
            raise ValueError(f"{spec.name}: query and document limits must be at least 3 tokens")
        # texts are tokenized one token short: the marker goes in after the first token
        self.query_tokenizer = copy.copy(tok)
        self.query_tokenizer.max_tokens = query_len - 1
        self.document_tokenizer = copy.copy(tok)
        self.document_tokenizer.max_tokens = self.max_tokens - 1
        self.query_length = query_len

    @staticmethod
    def _special(folder: Path, key: str) -> str | None:
        path = folder / "tokenizer_config.json"
        value = read_json(path).get(key) if path.exists() else None
        return value.get("content") if isinstance(value, dict) else value

    def _mask_token(self, folder: Path) -> int:
        for name in (self._special(folder, "mask_token"), "[MASK]", "<mask>"):
            if name is not None and self.tokenizer.token_id(name) is not None:
                return self.tokenizer.token_id(name)
        raise ValueError(f"{folder}: query expansion needs a mask token; the tokenizer has none")

    def _unk_token(self, folder: Path) -> int | None:
        for name in (self._special(folder, "unk_token"), "[UNK]", "<unk>"):
            if name is not None and self.tokenizer.token_id(name) is not None:
                return self.tokenizer.token_id(name)
        return None

    @classmethod
    def describe(cls, spec: ModelSpec, folder: Path) -> ModelInfo:
        dense = _dense_modules(folder)
        if dense:
            dim = read_json(folder / dense[-1] / "config.json").get("out_features")
        else:
            path = folder / "artifact.metadata"
            dim = read_json(path).get("dim", 128) if path.exists() else 128
        return ModelInfo(spec.name, spec.family, cls.output_types,
                         {"multivector": dim} if isinstance(dim, int) else {},
                         spec.max_input_tokens)

    def dims(self) -> dict[str, int]:
        return {"multivector": self.projection[-1][0].shape[0]}

    def prepare(self, texts: list[str], is_query: bool, instruction: str | None,
                template: str | None = None, limit: int | None = None) -> Tokenized:
        """Instruction and catalog prefixes as every family; then the marker after the first
        token, and for queries the expansion up to the query length (`limit`, where lower:
        the request's query_max_length / max_seq_length, as SIE's ColBERT adapter)."""
        tokenizer = self.query_tokenizer if is_query else self.document_tokenizer
        length = self.query_length if is_query else self.max_tokens
        if limit is not None and limit < length:
            length = max(limit, 3)  # [CLS] marker [SEP] at the least
            tokenizer = tokenizer.limited(length - 1)
        tok = tokenizer.encode(self.prefixed(texts, is_query, instruction, template))
        marker = self.query_marker if is_query else self.document_marker
        ids = []
        for a in tok.ids:
            a = np.insert(a, 1, marker)
            if is_query and self.mask_id is not None and len(a) < length:
                a = np.concatenate([a, np.full(length - len(a), self.mask_id, a.dtype)])
            ids.append(a)
        return Tokenized(ids, [n + 1 for n in tok.original_lengths])

    def _roles(self, batch: PackedBatch) -> np.ndarray:
        """Per sequence: True for a query (its marker, the second token)."""
        return batch.input_ids[batch.cu_seqlens[:-1] + 1] == self.query_marker

    def attention(self, batch: PackedBatch):
        """Expansion tokens are not attended unless the checkpoint says so: a query's keys
        stop after its last token that is not the mask token."""
        keys = None
        if self.mask_id is not None and not self.attend_expansion:
            ids, starts = batch.input_ids, batch.cu_seqlens[:-1]
            last = np.maximum.reduceat(np.where(ids != self.mask_id, np.arange(len(ids)), -1),
                                       starts)
            keys = np.where(self._roles(batch), last - starts + 1, batch.lengths)
        if self.stack is ModernBertEncoder:
            return self.encoder.attention(batch.cu_seqlens, self.placement.device,
                                          self.placement.dtype, keys)
        return make_attention(batch.cu_seqlens, self.placement.device, self.placement.dtype,
                              keys=keys)

    def heads(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor) -> BatchOutputs:
        x = hidden
        for w, b in self.projection:
            x = F.linear(x, w, b)
        # documents drop their skiplist tokens: decided on the host from the ids, so the
        # device sees a plain gather and never waits
        doc = np.repeat(~self._roles(batch), batch.lengths)
        keep = ~(doc & np.isin(batch.input_ids, self.skip_ids))
        counts = np.add.reduceat(keep.astype(np.int64), batch.cu_seqlens[:-1])
        rows = torch.from_numpy(np.flatnonzero(keep)).to(x.device, non_blocking=True)
        vecs = F.normalize(x.index_select(0, rows).float(), dim=-1)
        return BatchOutputs(multivector=(vecs, counts, 0))
