"""Tokenization with the model's own tokenizer.json (Rust `tokenizers`, GIL released)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass(frozen=True)
class Tokenized:
    ids: list[np.ndarray]  # per text, truncated to the limit
    original_lengths: list[int]  # tokens before truncation


class TextTokenizer:
    """Wraps a `tokenizers.Tokenizer`; truncation keeps the closing special token."""

    def __init__(self, path: Path, max_tokens: int) -> None:
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_tokens = max_tokens

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, texts: list[str]) -> Tokenized:
        encs = self._tok.encode_batch(texts, add_special_tokens=True)
        ids, lengths = [], []
        for e in encs:
            arr = np.asarray(e.ids, dtype=np.int64)
            lengths.append(len(arr))
            if len(arr) > self.max_tokens:
                arr = np.concatenate([arr[: self.max_tokens - 1], arr[-1:]])
            ids.append(arr)
        return Tokenized(ids, lengths)
