"""PackedBatch: the data-only contract between the scheduler and a model.

Sequences are concatenated without padding; `cu_seqlens` marks where each one starts.
`with_bucketed_tokens` rounds a batch's token count up to one of few sizes (CPU, see there).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class PackedBatch:
    input_ids: np.ndarray  # (T,) int64, all sequences back to back
    cu_seqlens: np.ndarray  # (B+1,) int64, sequence b is input_ids[cu[b]:cu[b+1]]
    token_type_ids: np.ndarray | None  # (T,) int64, for sentence pairs
    adapter_slots: np.ndarray  # (B,) int64, -1 = base model, else a loaded adapter's slot
    output_types: frozenset[str]  # union of what the rows asked for
    # Image rows (image models): their patches (I, patches, patch_dim) uint8 and their row
    # numbers (I,); an image row has no tokens in input_ids (its cu_seqlens span is empty).
    pixels: np.ndarray | None = None
    image_rows: np.ndarray | None = None
    bucketed_from: "PackedBatch | None" = None  # the batch this one pads (with_bucketed_tokens)
    # Sequences whose vectors stay as the model computes them, not L2-normalised (a
    # request's `normalize: false`); None: none.
    raw_rows: np.ndarray | None = None
    # Sequences to pool otherwise than the model does, by pooling (cls, mean, last_token; a
    # request's SIE `pooling`); None: none.
    pooling_rows: dict[str, np.ndarray] | None = None

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.cu_seqlens)

    @property
    def num_seqs(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])


def pack(
    seqs: list[np.ndarray],
    output_types: frozenset[str],
    adapter_slots: np.ndarray | None = None,
    token_types: list[np.ndarray] | None = None,
    raw_rows: np.ndarray | None = None,
    pooling_rows: dict[str, np.ndarray] | None = None,
) -> PackedBatch:
    """Concatenate token id arrays into one PackedBatch (no per-token Python work). 2-D
    entries are images (patches x patch_dim, from `images.to_patches`) and go to `pixels`."""
    pixels = image_rows = None
    if any(s.ndim == 2 for s in seqs):
        image_rows = np.flatnonzero([s.ndim == 2 for s in seqs])
        pixels = np.stack([seqs[i] for i in image_rows])
        seqs = [s if s.ndim == 1 else np.zeros(0, np.int64) for s in seqs]
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    cu = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    slots = adapter_slots if adapter_slots is not None else np.full(len(seqs), -1, dtype=np.int64)
    return PackedBatch(
        input_ids=np.concatenate(seqs).astype(np.int64, copy=False),
        cu_seqlens=cu,
        token_type_ids=None if token_types is None else np.concatenate(token_types).astype(np.int64),
        adapter_slots=slots,
        output_types=output_types,
        pixels=pixels,
        image_rows=image_rows,
        raw_rows=raw_rows if raw_rows is not None and len(raw_rows) else None,
        pooling_rows=pooling_rows or None,
    )


def bucket_tokens(n: int) -> int:
    """`n` rounded up to a multiple of max(8, P/32), P being the power of two at or above `n`:
    16 sizes per doubling (8 up to 64 tokens), at most max(7, n/16) tokens more (about 2%
    on average over 64..8,192)."""
    step = max(8, (1 << max(n - 1, 0).bit_length()) // 32)
    return -(-n // step) * step


def with_bucketed_tokens(batch: PackedBatch, pad_id: int) -> PackedBatch:
    """`batch` with one more sequence, of `pad_id` tokens, that brings its token count to
    `bucket_tokens` (at least 2 tokens: a model may read a sequence's second token).

    Why (CPU): oneDNN keeps a compiled kernel per matmul shape (up to 1,024), and packed
    batches change their token count almost every time, so a long-running CPU server's memory
    grew by hundreds of MB (README, Soak). With bucketed counts the shapes are few and memory
    levels off. The extra sequence is a sequence of its own (attention never mixes it with the
    others) without an adapter; a model drops its rows after the encoder."""
    n = batch.num_tokens
    target = bucket_tokens(n)
    if target - n == 1:
        target = bucket_tokens(n + 2)
    if target == n:
        return batch
    extra = target - n
    types = batch.token_type_ids
    return replace(
        batch,
        input_ids=np.concatenate([batch.input_ids, np.full(extra, pad_id, np.int64)]),
        cu_seqlens=np.append(batch.cu_seqlens, target),
        token_type_ids=None if types is None else np.concatenate([types, np.zeros(extra, np.int64)]),
        adapter_slots=np.append(batch.adapter_slots, -1),
        bucketed_from=batch,
    )


def positions(cu_seqlens: np.ndarray, offset: int, input_ids: np.ndarray | None = None,
              pad_id: int | None = None) -> np.ndarray:
    """Position id of every packed token, as the model's reference numbers them.

    Without `pad_id` (BERT): 0..n-1 inside each sequence, plus `offset`, whatever the ids.
    With `pad_id` (RoBERTa / XLM-R, transformers' `create_position_ids_from_input_ids`): a
    token whose id is `pad_id` (a literal `<pad>` in the text) takes position `pad_id` and does
    not advance the count; the others count from `offset` (= pad_id + 1) over non-pad tokens.
    """
    lengths = np.diff(cu_seqlens)
    if pad_id is None:
        starts = np.repeat(cu_seqlens[:-1], lengths)
        return np.arange(int(cu_seqlens[-1]), dtype=np.int64) - starts + offset
    real = input_ids != pad_id
    counted = np.cumsum(real, dtype=np.int64)
    before = np.concatenate(([0], counted))[cu_seqlens[:-1]]  # real tokens before each sequence
    within = counted - np.repeat(before, lengths)  # real tokens so far in this sequence
    return np.where(real, within - 1 + offset, pad_id)


def split_rows(rows: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Views of `rows` split into consecutive chunks of `counts` rows each."""
    return np.split(rows, np.cumsum(counts)[:-1])
