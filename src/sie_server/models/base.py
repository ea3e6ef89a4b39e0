"""What every model family provides, and the table of families.

A family is one module in this package that subclasses `EncoderModel` and registers itself
with `@family("name")`; nothing else needs to change to add one.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidRequest
from ..runtime.attention import make_attention
from ..runtime.batch import PackedBatch, positions, with_bucketed_tokens
from ..runtime.device import Placement
from ..runtime.encoder import Encoder, LinearHook
from ..runtime.tokenizer import TextTokenizer, Tokenized


@dataclass(frozen=True)
class ModelSpec:
    """A catalog entry: where a model comes from and how requests address it."""

    name: str
    family: str
    source: str  # local folder, hub id, or "package:<python package>/<subfolder>"
    max_input_tokens: int | None = None  # None: the model's own limit
    query_prefix: str = ""
    document_prefix: str = ""
    instruction_template: str = "{instruction}{text}"
    output_types: tuple[str, ...] | None = None  # None: the family's own
    matryoshka: bool = False  # dense vectors may be cut to fewer dimensions (OpenAI `dimensions`)
    matryoshka_min_dims: int | None = None  # the fewest it was trained for (Qwen3-Embedding: 32)
    pinned: bool = False  # never evicted
    score_activation: str | None = None  # cross-encoders: "sigmoid" | "none"; None: the model's config
    hypothesis_template: str | None = None  # NLI zero-shot: "This text is about {}."; None: the family's
    extract_threshold: float | None = None  # GLiNER: the default options.threshold (None: 0.5)
    merge_adjacent_entities: bool = False  # GLiNER: the default of that option (SIE's, per model)
    query_max_tokens: int | None = None  # ColBERT: query length (None: the checkpoint's)
    query_expansion: bool | None = None  # ColBERT: pad queries with mask tokens (None: checkpoint's)
    muvera: dict[str, Any] | None = None  # MUVERA settings (SIE's muvera_config keys); muvera.py
    # name -> runtime defaults, resolved (engine/profiles.py); "default" always present
    profiles: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}},
                                                compare=False)


@dataclass(frozen=True)
class ModelInfo:
    id: str
    family: str
    output_types: tuple[str, ...]
    dims: dict[str, int]
    max_input_tokens: int | None  # None: not known before the model is loaded
    dtype: str | None = None  # what the encoder computes in ("float32" | "bfloat16" | "float16")


@dataclass
class TokenWeights:
    """A sparse output still per token: (T,) ids and weights (0 = dropped) and the batch's
    sequence lengths. `reduce()` gives each sequence's unique ids (ascending) with their max
    weight, on the host."""

    ids: Any
    weights: Any
    lengths: np.ndarray

    def reduce(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, weights = _host(self.ids).astype(np.int64), _host(self.weights)
        keep = weights > 0
        seq = np.repeat(np.arange(len(self.lengths), dtype=np.int64), self.lengths)[keep]
        keys = (seq << 32) | ids[keep]
        order = np.argsort(keys, kind="stable")
        keys, weights = keys[order], weights[keep][order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else keys
        values = np.maximum.reduceat(weights, starts) if len(keys) else weights
        keys = keys[starts]
        counts = np.bincount(keys >> 32, minlength=len(self.lengths))
        return (keys & 0xFFFFFFFF).astype(np.int32), values.astype(np.float32), counts


def _host(t: Any) -> Any:
    """A device tensor as a numpy array (floats as float32); anything else unchanged."""
    if isinstance(t, torch.Tensor):
        return (t.float() if t.is_floating_point() else t).cpu().numpy()
    return t


@dataclass
class BatchOutputs:
    """Per-sequence results of one batch; rows follow the batch order.

    Models fill it with device tensors (the forward stays asynchronous on CUDA);
    `to_host()` waits for the device and gives the same structure as float32/int numpy arrays.
    """

    dense: Any = None  # (B, D)
    # indices, values, counts (B,) -- or per-token TokenWeights, reduced on the host
    sparse: tuple[Any, Any, Any] | TokenWeights | None = None
    # rows (N, D), rows per sequence (B,), leading rows of each sequence to drop
    multivector: tuple[Any, Any, int] | None = None
    scores: Any = None  # (B,) for scoring models

    def to_host(self) -> "BatchOutputs":
        sparse = self.sparse
        if isinstance(sparse, TokenWeights):
            sparse = sparse.reduce()
        elif sparse is not None:
            sparse = tuple(_host(t) for t in sparse)
        return BatchOutputs(
            dense=_host(self.dense),
            sparse=sparse,
            multivector=None if self.multivector is None else tuple(_host(t) for t in self.multivector),
            scores=_host(self.scores),
        )


@dataclass
class ExtractPlan:
    """An extraction turned into encoder rows: token ids per row (token types for pairs), what
    each row asks the heads for, and `finish`, turning the rows' results (ItemResults, in row
    order) into (one result dict per item, the input tokens the model read)."""

    rows: list[np.ndarray]
    output_types: frozenset[str]
    finish: Any  # Callable[[list[ItemResult]], tuple[list[dict], int]]
    type_ids: list[np.ndarray] | None = None


class EncoderModel(abc.ABC):
    """A transformer encoder plus heads; sees only PackedBatches."""

    output_types: tuple[str, ...] = ("dense",)
    # The score modes /v1/score offers (options.score_mode), the default first; () = this
    # model cannot score.
    score_types: tuple[str, ...] = ()
    # True: query and item go through the model together as one pair (cross-encoder), and the
    # model's heads return BatchOutputs.scores; False: scores come from the encoded outputs.
    pair_scoring: bool = False
    # True: a score request's instruction goes to the items too, not only to the query (SIE's
    # BGE-M3 score encodes both with it; its ColBERT score, the query alone)
    instructs_score_items: bool = False
    # What /v1/extract gives: "entities" (GLiNER) or "classifications" (NLI zero-shot);
    # None: the model does not extract. Such families implement `prepare_extract`.
    extracts: str | None = None
    # True: items may be images (ImageInput); the family implements `prepare_images`.
    embeds_images: bool = False
    # True: the heads leave a batch's `raw_rows` unnormalised (a request's normalize: false)
    # where they would L2-normalise vectors; False: they ignore it.
    raw_vectors: bool = False
    # True: `prepare` takes SIE's per-request `query_template` / `doc_template` (as SIE's
    # dense and SPLADE adapters do); False: they are ignored, as SIE's other adapters do.
    templates: bool = False
    # True: the heads pool a batch's `pooling_rows` as asked (SIE's per-request pooling, as
    # its dense adapters take it); False: the model pools by its own rule only.
    poolings: bool = False
    # SIE's per-request length options this family's `prepare` takes (`limit`), as SIE's
    # adapters for it do: max_seq_length (documents; SPLADE: every text), query_max_length
    # (ColBERT queries); others are ignored, as SIE's adapters ignore them.
    length_options: frozenset[str] = frozenset()
    # The transformer stack (runtime) of this family's checkpoints: `Encoder` (BERT / XLM-R),
    # `decoder.Decoder` (causal) or another architecture's; each loads with
    # from_folder(folder) -> (stack, unused weights).
    stack: type = Encoder

    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        self.spec = spec
        self.folder = folder
        self.placement = placement
        encoder, self.extra_weights = self.stack.from_folder(folder)
        self.encoder = placement.place(encoder)
        limit = self.encoder.cfg.max_tokens
        self.max_tokens = min(spec.max_input_tokens or limit, limit)
        self.tokenizer = TextTokenizer(folder / "tokenizer.json", self.max_tokens)

    # Replaced by the engine's adapter manager (engine/adapters.py) once LoRA is used: the
    # per-batch linear hook, and per head name the (token rows, weights) replacing a head.
    @staticmethod
    def adapter_hook(batch: PackedBatch) -> LinearHook | None:
        return None

    @staticmethod
    def adapter_heads(batch: PackedBatch, head: str) -> list[tuple[torch.Tensor, dict]]:
        return []

    @property
    def lora_config(self) -> Any:
        """What runtime/lora.py reads adapters against: a config with `num_layers` and the
        stack's dimensions, or one with `lora_layout()` (lora.layout_for)."""
        return self.encoder.cfg

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the model's tensors (encoder and heads; int8 and packed linears keep
        their weights as buffers)."""
        tensors = [*self.encoder.parameters(), *self.encoder.buffers(),
                   *(v for v in vars(self).values() if isinstance(v, torch.Tensor))]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.spec.name, self.spec.family, self.output_types, self.dims(),
                         self.max_tokens, self.placement.dtype_name)

    @classmethod
    def describe(cls, spec: ModelSpec, folder: Path) -> ModelInfo:
        """What the model offers, read from its folder's config.json without loading it
        (hidden size for dense and multivector, vocabulary size for sparse). Families whose
        dims come from elsewhere override this; `info` of the loaded model is authoritative."""
        config = json.loads((folder / "config.json").read_text())
        size = {"sparse": config.get("vocab_size")}
        dims = {t: size.get(t, config.get("hidden_size")) for t in cls.output_types}
        return ModelInfo(spec.name, spec.family, cls.output_types,
                         {t: d for t, d in dims.items() if isinstance(d, int)},
                         spec.max_input_tokens)

    def load_adapter_heads(self, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
        """Head weights an adapter folder carries for this family ({} = none; raise ValueError
        when they do not fit). Families with trainable heads override this."""
        return {}

    @abc.abstractmethod
    def dims(self) -> dict[str, int]:
        """Vector size of each output type."""

    @abc.abstractmethod
    def heads(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor) -> BatchOutputs:
        """Turn the packed last hidden state into the outputs the batch asked for."""

    def prepare(self, texts: list[str], is_query: bool, instruction: str | None,
                template: str | None = None, limit: int | None = None) -> Tokenized:
        """Apply the model's prefixes/instruction, then tokenize (cut at `limit` tokens where
        that is below the model's own limit)."""
        return self.tokenizer.limited(limit).encode(
            self.prefixed(texts, is_query, instruction, template))

    def prefixed(self, texts: list[str], is_query: bool, instruction: str | None,
                 template: str | None = None) -> list[str]:
        """The texts with the instruction (through the template) and the catalog's prefix;
        a request's `template` (`{text}`, `{instruction}`) replaces both."""
        if template is not None:
            return [template.format(text=t, instruction=instruction or "") for t in texts]
        if instruction is not None:
            texts = [self.spec.instruction_template.format(instruction=instruction, text=t)
                     for t in texts]
        prefix = self.spec.query_prefix if is_query else self.spec.document_prefix
        return [prefix + t for t in texts] if prefix else texts

    def prepare_extract(self, texts: list[str], labels: list[str], options: Any) -> ExtractPlan:
        """The rows of an extraction (families with `extracts` set)."""
        raise NotImplementedError

    def check_output_types(self, output_types: list[str]) -> None:
        if self.extracts:
            raise InvalidRequest(f"{self.spec.name} ({self.spec.family}) does not encode; it "
                                 "extracts: use /v1/extract")
        if not self.output_types:
            raise InvalidRequest(f"{self.spec.name} ({self.spec.family}) does not encode; "
                                 f"it scores query/item pairs: use /v1/score")
        bad = [t for t in output_types if t not in self.output_types]
        if bad:
            raise InvalidRequest(
                f"params.output_types: {bad[0]!r} is not served by {self.spec.name} "
                f"(it serves {', '.join(self.output_types)})")

    @torch.inference_mode()
    def forward(self, batch: PackedBatch) -> BatchOutputs:
        """Run the encoder on a packed batch and the heads on its output. On CPU the encoder
        sees the batch with its token count bucketed (runtime/batch.py); the heads see the
        batch's own tokens."""
        dev = self.placement.device
        cfg = self.encoder.cfg
        n = batch.num_tokens
        run = batch
        if dev.type == "cpu":
            run = with_bucketed_tokens(batch, getattr(cfg, "pad_token_id", None) or 0)
        ids = torch.from_numpy(run.input_ids).to(dev, non_blocking=True)
        # RoBERTa / XLM-R number positions from the ids (a typed <pad> keeps the padding
        # position); stacks without a padding position (BERT, decoders) count 0..n-1
        pos = torch.from_numpy(positions(run.cu_seqlens, cfg.position_offset, run.input_ids,
                                         getattr(cfg, "position_pad_id", None)))
        types = None
        if run.token_type_ids is not None:
            types = torch.from_numpy(run.token_type_ids).to(dev, non_blocking=True)
        attention = self.attention(run)
        hidden = self.encoder(ids, pos.to(dev, non_blocking=True), types, attention,
                              self.adapter_hook(run))
        return self.heads(batch, hidden[:n], ids[:n])

    def attention(self, batch: PackedBatch):
        """The attention the encoder's layers use on this batch (built once per batch)."""
        if hasattr(self.encoder, "layout"):  # DeBERTa: attention on padded sequences
            return self.encoder.layout(batch.cu_seqlens, self.placement.device)
        return make_attention(batch.cu_seqlens, self.placement.device, self.placement.dtype,
                              causal=getattr(self.encoder, "causal", False))

    def seq_index(self, batch: PackedBatch) -> torch.Tensor:
        """For every packed token, the index of its sequence in the batch."""
        lengths = torch.from_numpy(batch.lengths)
        return torch.repeat_interleave(torch.arange(batch.num_seqs), lengths).to(
            self.placement.device)

    def first_tokens(self, batch: PackedBatch) -> torch.Tensor:
        return torch.from_numpy(batch.cu_seqlens[:-1]).to(self.placement.device)

    def l2(self, batch: PackedBatch, vecs: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        """`vecs` (one row per sequence, or per token with `per_token`) L2-normalised, except
        the rows of the batch's `raw_rows` sequences, which stay as they are."""
        out = F.normalize(vecs, dim=-1)
        if batch.raw_rows is None:
            return out
        rows = batch.raw_rows
        if per_token:
            cu = batch.cu_seqlens
            rows = np.concatenate([np.arange(cu[r], cu[r + 1]) for r in rows])
        keep = torch.from_numpy(rows).to(vecs.device)
        return out.index_copy_(0, keep, vecs.index_select(0, keep))


FAMILIES: dict[str, type[EncoderModel]] = {}


def family(name: str):
    """Class decorator registering a model family under `name`."""

    def register(cls: type[EncoderModel]) -> type[EncoderModel]:
        FAMILIES[name] = cls
        return cls

    return register
