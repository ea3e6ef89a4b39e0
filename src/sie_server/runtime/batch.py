"""PackedBatch: the data-only contract between the scheduler and a model.

Sequences are concatenated without padding; `cu_seqlens` marks where each one starts.
"""

from __future__ import annotations

from dataclasses import dataclass

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
