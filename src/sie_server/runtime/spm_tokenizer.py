"""SigLIP's text tokenization from the checkpoint's `spiece.model` (SentencePiece), as
transformers' `SiglipTokenizer` does it with `padding="max_length"` and truncation:

a leading "▁"; lowercase character by character (`do_lower_case`, the default) except the
special-token strings, which are split out (`</s>`, `<unk>`; the whitespace beside them
stripped) and kept as their ids; in every other piece ASCII punctuation removed, whitespace
runs collapsed, the ends stripped, then SentencePiece (its dummy prefix off) on
`"<unk>" + piece` with the pieces of `"<unk>"` dropped again; a lone "▁" before a leading
special token dropped; `</s>` appended unless the ids end with it; cut to `length` keeping
`</s>`; padded to `length` with the pad token (`</s>`). SigLIP attends to the padding and
pools the last position, so every text is exactly `length` tokens.
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
# ModelProto field 3 (normalizer_spec) holding field 3 (add_dummy_prefix) = false: appended to
# the model file, protobuf merges it into the normalizer spec (what SiglipTokenizer does).
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


def _token(config: dict, key: str, default: str) -> str:
    value = config.get(key) or default
    return value["content"] if isinstance(value, dict) else value


class SiglipTextTokenizer:
    """Token ids of exactly `length` per text (see the module docstring)."""

    def __init__(self, folder: Path, length: int) -> None:
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text()) if path.exists() else {}
        proto = (folder / "spiece.model").read_bytes() + _NO_DUMMY_PREFIX
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.lower = bool(config.get("do_lower_case", True))
        self._unk = _token(config, "unk_token", "<unk>")
        self._unk_pieces = len(self._sp.encode(self._unk, out_type=str))
        eos, pad = _token(config, "eos_token", "</s>"), _token(config, "pad_token", "</s>")
        self._specials = {t: self._sp.piece_to_id(t) for t in (eos, self._unk, pad)}
        alternatives = "|".join(map(re.escape, sorted(self._specials, key=len, reverse=True)))
        self._split = re.compile(f"({alternatives})")
        self._lowercase = re.compile(f"({alternatives})|(.+?)")
        self.eos_id, self.pad_id = self._specials[eos], self._specials[pad]
        self.max_tokens = length

    def limited(self, max_tokens: int | None) -> "SiglipTextTokenizer":
        """This tokenizer: every SigLIP text is exactly `length` tokens, so a request's limit
        does not apply (SIE's SigLIP adapter takes none; `EncoderModel.length_options`)."""
        return self

    def tokens(self, text: str) -> list[str]:
        """The pieces of one text, special tokens included, before `</s>` is appended."""
        text = "▁" + text.replace("▁", " ")
        if self.lower:
            text = self._lowercase.sub(lambda m: m.group(1) or m.group(2).lower(), text)
        parts = self._split.split(text)  # odd positions: special tokens
        for i in range(1, len(parts), 2):
            parts[i - 1], parts[i + 1] = parts[i - 1].rstrip(), parts[i + 1].lstrip()
        out: list[str] = []
        for i, part in enumerate(parts):
            if i % 2:
                out.append(part)
            elif part:
                canonical = _SPACES.sub(" ", part.translate(_PUNCTUATION)).strip()
                out += self._sp.encode(self._unk + canonical, out_type=str)[self._unk_pieces:]
        if len(out) > 1 and out[0] == "▁" and out[1] in self._specials:
            out = out[1:]
        return out

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def encode(self, texts: list[str]) -> Tokenized:
        n = self.max_tokens
        ids, lengths = [], []
        for text in texts:
            p = [self._specials[t] if t in self._specials else self._sp.piece_to_id(t)
                 for t in self.tokens(text)]
            ends = bool(p) and p[-1] == self.eos_id
            lengths.append(len(p) + (not ends))  # before truncation, with </s>
            if len(p) + 1 > n:
                p = p[: n - 1]
            if not p or p[-1] != self.eos_id:
                p.append(self.eos_id)
            arr = np.full(n, self.pad_id, dtype=np.int64)
            arr[: len(p)] = p
            ids.append(arr)
        return Tokenized(ids, lengths)
