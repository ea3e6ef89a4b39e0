"""SigLIP's text tokenization from the checkpoint's `spiece.model` (SentencePiece), as
transformers' `SiglipTokenizer` does it with `padding="max_length"` and truncation:

lowercase character by character (`do_lower_case`, the default), a leading "▁", ASCII
punctuation removed, whitespace runs collapsed and the ends stripped; SentencePiece on
`"<unk>" + text` with the pieces of `"<unk>"` dropped again (so the leading "▁" survives
whatever the model's dummy-prefix setting); `</s>` appended; cut to `length` keeping `</s>`;
padded to `length` with the pad token (`</s>`). SigLIP attends to the padding and pools the
last position, so every text is exactly `length` tokens.

Not reproduced: special-token strings written inside a text (`"</s>"`) are tokenized as
text here, where transformers keeps them as the special token.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .tokenizer import Tokenized

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SPACES = re.compile(r"\s+")


def _token(config: dict, key: str, default: str) -> str:
    value = config.get(key) or default
    return value["content"] if isinstance(value, dict) else value


class SiglipTextTokenizer:
    """Token ids of exactly `length` per text (see the module docstring)."""

    def __init__(self, folder: Path, length: int) -> None:
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text()) if path.exists() else {}
        self._sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
        self.lower = bool(config.get("do_lower_case", True))
        self._unk = _token(config, "unk_token", "<unk>")
        self._unk_pieces = len(self._sp.encode(self._unk))
        self.eos_id = self._sp.piece_to_id(_token(config, "eos_token", "</s>"))
        self.pad_id = self._sp.piece_to_id(_token(config, "pad_token", "</s>"))
        self.max_tokens = length

    def canonical(self, text: str) -> str:
        text = "▁" + text.replace("▁", " ")
        if self.lower:
            text = "".join(map(str.lower, text))  # per character, as transformers lowercases
        return _SPACES.sub(" ", text.translate(_PUNCTUATION)).strip()

    def encode(self, texts: list[str]) -> Tokenized:
        n = self.max_tokens
        pieces = self._sp.encode([self._unk + self.canonical(t) for t in texts])
        ids, lengths = [], []
        for p in pieces:
            p = p[self._unk_pieces:]
            lengths.append(len(p) + 1)  # before truncation, with </s>
            p = p[: n - 1]
            arr = np.full(n, self.pad_id, dtype=np.int64)
            arr[: len(p)] = p
            arr[len(p)] = self.eos_id
            ids.append(arr)
        return Tokenized(ids, lengths)
