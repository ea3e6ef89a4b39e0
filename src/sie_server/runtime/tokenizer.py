"""Tokenization with the model's own tokenizer.json (Rust `tokenizers`).

`encode_batch` releases the GIL and runs on Rust threads: right for large inputs, but a thread
that gives up the GIL waits for it to come back, up to the interpreter's switch interval when
another thread (the model's compute thread) is running Python. So a few short texts, as the
HTTP event loop tokenizes them inline, go through `encode`, which keeps the GIL for the ~30 us
it takes. Measured with one busy Python thread: one query 1,843 us with `encode_batch`, 46 us
with `encode` (switch interval 5 ms).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .weights import reading


@dataclass(frozen=True)
class Tokenized:
    ids: list[np.ndarray]  # per text, truncated to the limit
    original_lengths: list[int]  # tokens before truncation
    type_ids: list[np.ndarray] | None = None  # per text, for sentence pairs


@dataclass(frozen=True)
class PairTemplate:
    """Where the special tokens of a pair go: prefix A middle B suffix, with their type ids."""

    parts: tuple[np.ndarray, np.ndarray, np.ndarray]  # special ids: prefix, middle, suffix
    part_types: tuple[np.ndarray, np.ndarray, np.ndarray]
    type_a: int
    type_b: int

    @property
    def num_specials(self) -> int:
        return sum(len(p) for p in self.parts)


SMALL_INPUT_CHARS = 4096  # up to this many characters in all: `encode`, keeping the GIL


class TextTokenizer:
    """Wraps a `tokenizers.Tokenizer`; truncation keeps the closing special token."""

    def __init__(self, path: Path, max_tokens: int) -> None:
        with reading(path):
            self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_tokens = max_tokens
        self._pair_template: PairTemplate | None = None

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _encode_all(self, texts: list[str], add_special_tokens: bool) -> list:
        if sum(map(len, texts)) <= SMALL_INPUT_CHARS:
            return [self._tok.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        return self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)

    def encode(self, texts: list[str]) -> Tokenized:
        encs = self._encode_all(texts, True)
        ids, lengths = [], []
        for e in encs:
            arr = np.asarray(e.ids, dtype=np.int64)
            lengths.append(len(arr))
            if len(arr) > self.max_tokens:
                arr = np.concatenate([arr[: self.max_tokens - 1], arr[-1:]])
            ids.append(arr)
        return Tokenized(ids, lengths)

    def pair_template(self) -> PairTemplate:
        """The model's pair template, learnt once by post-processing two one-token sequences."""
        if self._pair_template is None:
            a = self._tok.encode("a", add_special_tokens=False)
            b = self._tok.encode("b", add_special_tokens=False)
            pair = self._tok.post_process(a, b, add_special_tokens=True)
            ids, types = np.asarray(pair.ids, np.int64), np.asarray(pair.type_ids, np.int64)
            # find the two sequences by their token ids (Encoding.sequence_ids is unreliable
            # after post_process)
            hits_a, hits_b = np.flatnonzero(ids == a.ids[0]), np.flatnonzero(ids == b.ids[0])
            if len(a.ids) != 1 or len(b.ids) != 1 or len(hits_a) != 1 or len(hits_b) != 1 \
                    or hits_a[0] >= hits_b[0]:
                raise ValueError("the tokenizer's pair template is not `specials A specials B "
                                 "specials`; pair scoring is not supported with it")
            ia, ib = int(hits_a[0]), int(hits_b[0])
            cuts = [(0, ia), (ia + 1, ib), (ib + 1, len(ids))]
            self._pair_template = PairTemplate(
                tuple(ids[i:j] for i, j in cuts), tuple(types[i:j] for i, j in cuts),
                int(types[ia]), int(types[ib]))
        return self._pair_template

    def encode_pairs(self, first: str, seconds: list[str]) -> tuple[int, Tokenized]:
        """`first` paired with each of `seconds` through the model's pair template; `first` is
        tokenized once. Over-long pairs lose tokens from the end of the second text only (as
        Hugging Face's truncation="only_second"). Returns (tokens of `first` with the pair's
        special tokens, pairs); the caller refuses a `first` that leaves no room."""
        t = self.pair_template()
        a = np.asarray(self._tok.encode(first, add_special_tokens=False).ids, dtype=np.int64)
        fixed = len(a) + t.num_specials
        room = max(self.max_tokens - fixed, 0)
        (pre, mid, suf), (tpre, tmid, tsuf) = t.parts, t.part_types
        head = np.concatenate([pre, a, mid])
        head_types = np.concatenate([tpre, np.full(len(a), t.type_a, np.int64), tmid])
        ids, types, lengths = [], [], []
        for e in self._encode_all(seconds, False):
            b = np.asarray(e.ids, dtype=np.int64)
            lengths.append(fixed + len(b))
            b = b[:room]
            ids.append(np.concatenate([head, b, suf]))
            types.append(np.concatenate([head_types, np.full(len(b), t.type_b, np.int64), tsuf]))
        return fixed, Tokenized(ids, lengths, types)
