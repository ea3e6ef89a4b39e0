"""The two tokenization paths (`encode` per text for small inputs, keeping the GIL;
`encode_batch` on Rust threads for large ones) give identical ids, lengths and truncation,
for single texts and for sentence pairs, on the real XLM-R tokenizer."""
from __future__ import annotations

import numpy as np
import pytest
from reference import xlmr_tokenizer_json
from texts import EDGE_TEXTS, TEXTS

from sie_server.runtime import tokenizer as tokenizer_mod
from sie_server.runtime.tokenizer import TextTokenizer


def both_ways(monkeypatch, call):
    monkeypatch.setattr(tokenizer_mod, "SMALL_INPUT_CHARS", 1 << 40)  # every input: encode
    small = call()
    monkeypatch.setattr(tokenizer_mod, "SMALL_INPUT_CHARS", -1)  # every input: encode_batch
    return small, call()


@pytest.mark.parametrize("max_tokens", [8192, 16])
def test_encode_paths_agree(monkeypatch, max_tokens) -> None:
    tok = TextTokenizer(xlmr_tokenizer_json(), max_tokens)
    texts = TEXTS + EDGE_TEXTS
    small, batch = both_ways(monkeypatch, lambda: tok.encode(texts))
    assert small.original_lengths == batch.original_lengths
    assert max(small.original_lengths) > max_tokens  # truncation is exercised
    for a, b in zip(small.ids, batch.ids, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pair_paths_agree(monkeypatch) -> None:
    tok = TextTokenizer(xlmr_tokenizer_json(), 64)
    (fa, a), (fb, b) = both_ways(monkeypatch, lambda: tok.encode_pairs(TEXTS[0], TEXTS[:40]))
    assert fa == fb and a.original_lengths == b.original_lengths
    for x, y, tx, ty in zip(a.ids, b.ids, a.type_ids, b.type_ids, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(tx, ty)
