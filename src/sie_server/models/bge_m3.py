"""BGE-M3: XLM-RoBERTa + a sparse head and a ColBERT head; all three outputs from one forward.

Semantics follow FlagEmbedding's BGEM3FlagModel:
- dense: the `<s>` (CLS) hidden state, L2-normalised (`normalize_embeddings`: a request's
  `normalize: false` leaves its dense and multivector rows as computed);
- sparse: relu(sparse_linear(h)) per token, max over repeated ids, `<s> </s> <pad> <unk>`
  and weights <= 0 dropped;
- multivector: colbert_linear(h) on every token but `<s>` (`</s>` kept), each L2-normalised.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..runtime.batch import PackedBatch
from ..runtime.device import Placement
from ..runtime.weights import DamagedFile, load_torch_file, reading
from .base import BatchOutputs, EncoderModel, ModelSpec, TokenWeights, family

HEAD_FILES = ("colbert_linear.pt", "sparse_linear.pt")


def load_heads(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Both head files of a BGE-M3 folder; refuses a folder missing either one."""
    missing = [f for f in HEAD_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} has no {' or '.join(missing)}: BGE-M3 needs both head files beside the "
            "weights (FlagEmbedding would silently use random heads; we refuse)")
    heads = {}
    for f in HEAD_FILES:
        with reading(folder / f):
            sd = load_torch_file(folder / f)
        if not (isinstance(sd, dict) and all(isinstance(sd.get(k), torch.Tensor)
                                             for k in ("weight", "bias"))):
            raise DamagedFile(folder / f, "it holds no Linear state dict (weight and bias)")
        heads[f.removesuffix(".pt")] = sd
    return heads


def linear_rows(hidden: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                overrides=()) -> torch.Tensor:
    """F.linear(hidden, w, b), with the rows of each (rows, {"weight", "bias"}) override
    computed with that override's weights instead (LoRA adapters carrying their own heads)."""
    out = F.linear(hidden, w, b)
    for rows, head in overrides:
        out.index_copy_(0, rows, F.linear(hidden.index_select(0, rows), head["weight"],
                                          head["bias"]))
    return out


@family("bge-m3")
class BgeM3(EncoderModel):
    output_types = ("dense", "sparse", "multivector")
    pooling = "cls"  # dense: the <s> token, L2-normalised
    raw_vectors = True
    score_types = ("dense", "sparse", "colbert", "hybrid")  # SIE's score modes, engine/scoring.py
    instructs_score_items = True  # SIE's bge_m3_score_mixin encodes the items with it too

    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        heads = load_heads(folder)
        super().__init__(spec, folder, placement)
        dev, dt = placement.device, placement.dtype
        self.colbert_w = heads["colbert_linear"]["weight"].to(dev, dt)
        self.colbert_b = heads["colbert_linear"]["bias"].to(dev, dt)
        self.sparse_w = heads["sparse_linear"]["weight"].to(dev, dt)
        self.sparse_b = heads["sparse_linear"]["bias"].to(dev, dt)
        specials = {self.tokenizer.token_id(t) for t in ("<s>", "</s>", "<pad>", "<unk>")}
        self.special_ids = torch.tensor(sorted(i for i in specials if i is not None), device=dev)

    def dims(self) -> dict[str, int]:
        return {"dense": self.encoder.cfg.hidden_size, "sparse": self.encoder.cfg.vocab_size,
                "multivector": self.colbert_w.shape[0]}

    def heads(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor) -> BatchOutputs:
        out = BatchOutputs()
        want = batch.output_types
        first = self.first_tokens(batch)
        if "dense" in want:
            out.dense = self.l2(batch, hidden[first].float())
        if "sparse" in want:
            out.sparse = self.sparse(batch, hidden, ids, self.sparse_w, self.sparse_b,
                                     self.adapter_heads(batch, "sparse_linear"))
        if "multivector" in want:
            out.multivector = self.multivector(batch, hidden, first, self.colbert_w, self.colbert_b,
                                               self.adapter_heads(batch, "colbert_linear"))
        return out

    def load_adapter_heads(self, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
        """The head files a LoRA adapter folder carries (FlagEmbedding fine-tuning saves them
        beside the adapter); each replaces the base head for that adapter's rows."""
        base = {"colbert_linear": (self.colbert_w, self.colbert_b),
                "sparse_linear": (self.sparse_w, self.sparse_b)}
        out = {}
        for fname in HEAD_FILES:
            if not (folder / fname).is_file():
                continue
            head = fname.removesuffix(".pt")
            sd = load_torch_file(folder / fname)
            w, b = (sd.get("weight"), sd.get("bias")) if isinstance(sd, dict) else (None, None)
            bw, bb = base[head]
            if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
                raise ValueError(f"{fname} must hold a Linear state dict (weight and bias)")
            if w.shape != bw.shape or b.shape != bb.shape:
                raise ValueError(f"{fname} has weight {tuple(w.shape)} / bias {tuple(b.shape)}; "
                                 f"the model's head is {tuple(bw.shape)} / {tuple(bb.shape)}")
            out[head] = {"weight": w.to(bw.device, bw.dtype), "bias": b.to(bb.device, bb.dtype)}
        return out

    def sparse(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor,
               w: torch.Tensor, b: torch.Tensor, overrides=()) -> TokenWeights:
        """relu(sparse_linear(h)) per token, 0 for special ids; the max over repeated ids is
        taken on the host (TokenWeights), so the device never waits on a data-dependent size."""
        weights = torch.relu(linear_rows(hidden, w, b, overrides)).squeeze(-1).float()
        return TokenWeights(ids, weights.masked_fill(torch.isin(ids, self.special_ids), 0.0),
                            batch.lengths)

    def multivector(self, batch: PackedBatch, hidden: torch.Tensor, first: torch.Tensor,
                    w: torch.Tensor, b: torch.Tensor, overrides=()):
        """ColBERT vectors of every token, L2-normalised; the host drops each sequence's first
        row (`<s>`) when splitting, which keeps the device free of boolean indexing."""
        vecs = self.l2(batch, linear_rows(hidden, w, b, overrides).float(), per_token=True)
        return vecs, batch.lengths, 1
