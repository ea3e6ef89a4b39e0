"""Request and result types of the SIE SDK."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NotRequired, TypedDict

import numpy as np
import numpy.typing as npt

@dataclass(slots=True)
class Item:
    """One input: its text, or for image models one image (encoded bytes, or
    `{"data": bytes, "format": "png"}`), and an optional caller-chosen id echoed back."""

    text: str | None = None
    id: str | None = None
    images: list[bytes | dict] | None = None


class EncodeOptions(TypedDict, total=False):
    """Per-request options of `/v1/encode` (see docs/API.md)."""

    truncate: bool
    is_query: bool
    instruction: str | None
    lora_id: str | None
    timeout_s: float
    output_dtype: str  # as `output_dtype=`: float32 | float16 | int8 | uint8 | binary | ubinary
    profile: str  # one of the model's profiles (docs/CATALOG.md), as `model:profile`
    normalize: bool  # false: vectors before the model's own L2 step (BGE-M3, ST models)
    query_template: str  # SIE's: "{instruction}: {text}"-style, replaces the model's prefix
    doc_template: str
    max_seq_length: int  # SIE's: a lower token limit (ColBERT documents, SPLADE)
    query_max_length: int  # SIE's: ColBERT queries' length
    pooling: str  # SIE's: "cls" | "mean" | "last" (sentence-transformers models)
    default_instruction: str  # SIE's: the instruction of queries sent without one
    overflow_policy: str  # SIE's: "default" | "truncate_text" | "error" (= truncate false)


class SparseVector(TypedDict):
    """Sparse output: token ids (int32) and their weights (float32), same length."""

    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float32]


class EncodeResult(TypedDict):
    """One encoded item; only the requested output types are present."""

    id: str | None
    token_count: int
    truncated: bool
    # float32 unless `output_dtype` says otherwise (int8, uint8, float16; binary: uint8 bits)
    dense: NotRequired[npt.NDArray[np.float32]]  # (dim,)
    sparse: NotRequired[SparseVector]
    multivector: NotRequired[npt.NDArray[np.float32]]  # (tokens, dim)
    timing: NotRequired[dict[str, float]]  # the request's server-side ms (SIE's TimingInfo)


class ScoreEntry(TypedDict):
    """Score of one item against the query; rank 0 is the best."""

    item_id: str  # the item's id, or "item-{i}" (its position) when it had none
    score: float
    rank: int
    components: NotRequired[dict[str, float]]  # BGE-M3: the scores computed (dense, sparse,
    # colbert, hybrid)


class ScoreResult(TypedDict):
    """Response of `/v1/score/{model}`."""

    model: str
    scores: list[ScoreEntry]
    score_mode: NotRequired[str]  # which score ranks ("relevance", "dense", "hybrid", ...)
    score_weights: NotRequired[dict[str, float]]  # hybrid: the weights used
    timing: NotRequired[dict[str, float]]  # server-side ms: total, queue, tokenization, ...
    activation: NotRequired[str]  # cross-encoders: "sigmoid" or "none"
    query_id: NotRequired[str]  # the query item's id, when it had one
    usage: NotRequired[dict[str, int]]  # {"input_tokens": tokens the model saw}


class Entity(TypedDict):
    """A span found by `extract`: its text, label and score, and its character offsets in the
    item's text (`text == item_text[start:end]`)."""

    text: str
    label: str
    score: float
    start: int | None
    end: int | None
    bbox: NotRequired[list[int] | None]


class Classification(TypedDict):
    label: str
    score: float


class ExtractItemError(TypedDict):
    code: str  # e.g. "INPUT_TOO_LONG"
    message: str


class ExtractResult(TypedDict, total=False):
    """One item's extraction (SIE's ExtractResult): GLiNER models fill `entities`, zero-shot
    classifiers `classifications`; `relations`, `objects` and `data` are SIE's other kinds;
    `error` is set for an item the server could not read (the others are still answered)."""

    model: str
    id: str
    entities: list[Entity]
    relations: list[dict]
    classifications: list[Classification]
    objects: list[dict]
    data: dict
    error: ExtractItemError
