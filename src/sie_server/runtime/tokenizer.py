"""Tokenization with the model's own tokenizer.json (Rust `tokenizers`).

`encode_batch` releases the GIL and runs on Rust threads: right for large inputs, but a thread
that gives up the GIL waits for it to come back, up to the interpreter's switch interval when
another thread (the model's compute thread) is running Python. So a few short texts, as the
HTTP event loop tokenizes them inline, go through `encode`, which keeps the GIL for the ~30 us
it takes. Measured with one busy Python thread: one query 1,843 us with `encode_batch`, 46 us
with `encode` (switch interval 5 ms).

Long texts are cut before they are tokenized, so work and memory follow what the model sees,
not the body (a 60 MB text took 66 s and 5 GB whole). The cut keeps exactly the tokens that
tokenizing the whole text and truncating would keep. Why, for the tokenizers it is used with
(anything else is tokenized whole, as before):

1. Tokens never cross pre-token (word) boundaries: the model (WordPiece, Unigram, BPE)
   tokenizes each pre-token on its own, so the text's tokens are its words' tokens in order.
2. The accepted normalizers (BertNormalizer, Precompiled, NF*, Lowercase, StripAccents, Strip,
   Replace of a short string or of runs of spaces) and pre-tokenizers (Metaspace with split,
   BertPreTokenizer, Whitespace, WhitespaceSplit, Punctuation, Digits) decide each character
   from at most a few characters around it (added tokens are shorter than the margin). So
   the first L characters, tokenized alone, give the whole text's words exactly for every word
   that ends at least `_MARGIN` characters before L; only words near the cut may differ.
3. So a window of L characters settles the tokens of its words that end before L - margin
   ("settled"). If they are enough, the text is longer than the model takes and they are its
   first tokens; else the window doubles, until it holds the whole text (tokenized whole).
4. One huge word settles nothing. WordPiece: a word longer than `max_input_chars_per_word`
   characters is one [UNK] whatever follows, so a window that holds more than that of a word
   settles it; BERT's pre-tokenization has no context, so the text after the word (found by
   scanning in chunks) is tokenized on its own and the tokens appended. Unigram (Viterbi,
   `encode_optimized` in tokenizers' models/unigram/model.rs): the best path to position b of
   a word is computed from its first b characters only (each node takes the first best of
   the pieces ending there, in left-to-right order), with the same floating-point sums
   whatever follows, so the library run on the word's first b characters gives it exactly.
   Pieces have at most m characters (unknown characters one each), so every segmentation has
   a node in [x, x + m), and the whole word's path, which is the best path to each of its
   nodes, begins with the best path to one b there. Where all m of those share a node (each
   node has one best path, so they agree up to it), their tokens up to it are the whole
   word's (m runs of the model on at most a window); a trailing [UNK] (or its byte pieces)
   is dropped, as the word may go on fusing unknown characters into it. The word's text is
   that of the window's tokens that end before L - margin (normalized, so a cut never changes
   normalization; with byte pieces in them, nothing is settled this way). A "forced cut",
   a point that no piece spans, is the special case where all paths share that point.
5. Otherwise the window doubles, up to `_MAX_WINDOW` characters. A word not settled there
   (BPE: any; Unigram: one of more than 262,144 characters whose best paths do not meet,
   as in XLM-R's "a" * k, read "▁", "aaaa", "aaaaa"... or "▁a", "a", "a", "aaaaa"... as
   k % 5 says, so that its first tokens depend on where it ends; repeated one- to
   three-character patterns do this, while prose, random text, CJK, emoji and combining
   marks meet within a few pieces) is refused (`UnsettledWord`, a 413 naming the item),
   never guessed; so is a word of characters the vocabulary lacks (one [UNK] that could go
   on). Exactness for such words would need the whole word tokenized: the unbounded cost
   this module exists to avoid.
   Runs of spaces are shortened first to 128 when the normalizer turns a run of 128
   and of 129 between two letters into the same thing (XLM-R's " {2,}" -> " "): by point 2
   each further space adds nothing, so the text normalizes, and tokenizes, the same.

A text cut this way reports a lower bound for its token count (more than the model takes),
which is all `truncated` and `truncate: false` need.
"""

from __future__ import annotations

import bisect
import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from .weights import reading


@dataclass(frozen=True)
class Tokenized:
    ids: list[np.ndarray]  # per text, truncated to the limit
    original_lengths: list[int]  # tokens before truncation (a lower bound above the limit)
    type_ids: list[np.ndarray] | None = None  # per text, for sentence pairs


class UnsettledWord(ValueError):
    """A text holding one word of more than `_MAX_WINDOW` characters whose first tokens
    depend on how it ends (module docstring, point 5). `index`: the text's position among
    those tokenized, None for the first text of a pair."""

    def __init__(self, index: int | None = 0) -> None:
        super().__init__(f"one word of more than {_MAX_WINDOW:,} characters whose first "
                         "tokens depend on how it ends")
        self.index = index


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
_CHARS_PER_TOKEN = 8  # first window: this many characters per token wanted (tokens average ~4)
_MIN_WINDOW = 4096
_MAX_WINDOW = 1 << 18  # see the module docstring, point 5
_MARGIN = 64  # characters before a window's end whose words are not trusted
_SCAN_CHUNK = 1 << 16  # WordPiece: characters per step when looking for a huge word's end
_CONVERGE_SLACK = 16  # Unigram: tokens past the wanted ones where best paths are compared
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_LONG_SPACES = re.compile(" {%d,}" % (2 * _MARGIN + 1))

# Every character BERT may split a word at (whitespace, punctuation, CJK, controls) and more:
# a run of other characters lies inside one word.
_MAYBE_BERT_BOUNDARY = re.compile(r"[\W_\u3000-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]")
_LOCAL_NORMALIZERS = {"BertNormalizer", "Precompiled", "NFC", "NFD", "NFKC", "NFKD",
                      "Lowercase", "StripAccents", "Strip"}
_LOCAL_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Punctuation",
                         "Digits"}


def _local(node: dict | None, kind: str) -> bool:
    """Whether a normalizer / pre-tokenizer config decides each character locally."""
    if node is None:
        return True
    t = node.get("type")
    if t == "Sequence":
        return all(_local(n, kind) for n in node.get(f"{kind}s", []))
    if kind == "normalizer":
        if t == "Replace":
            pattern = node.get("pattern", {})
            return (len(pattern.get("String", "x" * _MARGIN)) < _MARGIN
                    or pattern.get("Regex") == " {2,}")
        return t in _LOCAL_NORMALIZERS
    if t == "Metaspace":
        return node.get("split", True)
    return t in _LOCAL_PRE_TOKENIZERS


class TextTokenizer:
    """Wraps a `tokenizers.Tokenizer`; truncation keeps the closing special token."""

    def __init__(self, path: Path, max_tokens: int) -> None:
        with reading(path):
            self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_tokens = max_tokens
        self._pair_template: PairTemplate | None = None
        cfg = json.loads(self._tok.to_str())
        model = cfg.get("model", {})
        longest_added = max((len(a["content"]) for a in cfg.get("added_tokens", [])), default=0)
        self._kind = model.get("type") if (
            _local(cfg.get("normalizer"), "normalizer")
            and _local(cfg.get("pre_tokenizer"), "pre_tokenizer")
            and longest_added < _MARGIN) else None  # None: texts are tokenized whole
        self._max_word_chars = model.get("max_input_chars_per_word", 100)
        unk = model.get("unk_token")  # WordPiece's; BPE models may have none (null)
        self._unk = model.get("unk_id") if self._kind == "Unigram" else \
            (self._tok.token_to_id(unk) if unk else None)
        a = self._tok.encode("a", add_special_tokens=False)
        single = self._tok.post_process(a, None, add_special_tokens=True).ids
        at = single.index(a.ids[0]) if len(a.ids) == 1 and a.ids[0] in single else -1
        self._prefix, self._suffix = (single[:at], single[at + 1:]) if at >= 0 else ([], [])
        if at < 0 or not self._suffix:  # truncation needs a closing special token to keep
            self._kind = None
        normalizer = self._tok.normalizer  # does it make any long run of spaces one thing?
        self._squeeze = normalizer is not None and len({normalizer.normalize_str(
            "a" + " " * (2 * _MARGIN + k) + "b") for k in (0, 1)}) == 1
        # Unigram: (the model alone, its longest piece, ids of the unknown and byte pieces)
        self._unigram: tuple[Tokenizer, int, set[int]] | None = None
        if self._kind == "Unigram":
            vocab = self._tok.get_vocab(with_added_tokens=False)
            fallback = {i for t, i in vocab.items() if _BYTE_PIECE.fullmatch(t)} \
                if model.get("byte_fallback") else set()
            self._unigram = (Tokenizer(self._tok.model), max(map(len, vocab)),
                             fallback | {self._unk})

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def tokens(self, text: str, add_special_tokens: bool = True) -> Encoding:
        """The whole text's Encoding (ids, tokens, offsets, special-token mask), uncut: for
        showing how a text tokenizes (TEI's /tokenize), not for the model."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def piece(self, token_id: int) -> str:
        """The vocabulary's string for a token id ("▁Hello", "##ing", "<s>")."""
        return self._tok.id_to_token(token_id) or ""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Token ids as text, special tokens kept unless skipped (one id: the token as a
        word)."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _encode_all(self, texts: list[str], add_special_tokens: bool) -> list:
        if sum(map(len, texts)) <= SMALL_INPUT_CHARS:
            return [self._tok.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        return self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)

    def _heads(self, texts: list[str], need: int) -> list[tuple[list[int], bool]]:
        """Per text: (its content ids, True) or, when it has more than `need - 1`, (at least
        `need` of its first content ids, False); short texts tokenized together."""
        first = max(_CHARS_PER_TOKEN * need, _MIN_WINDOW)
        out: list[tuple[list[int], bool] | None] = [None] * len(texts)
        short = [i for i, t in enumerate(texts) if self._kind is None or len(t) <= first]
        for i, e in zip(short, self._encode_all([texts[i] for i in short], False)):
            out[i] = (e.ids, True)
        for i, t in enumerate(texts):
            if out[i] is None:
                try:
                    out[i] = self._head(t, need, first)
                except UnsettledWord as e:
                    e.index = i
                    raise
        return out  # type: ignore[return-value]

    def _head(self, text: str, need: int, window: int) -> tuple[list[int], bool]:
        """One long text: see the module docstring. WordPiece moves on past what is settled
        (`base`); the others re-read a doubled window from the start."""
        if self._squeeze:  # point 5 of the module docstring
            text = _LONG_SPACES.sub(" " * (2 * _MARGIN), text)
        ids: list[int] = []
        base = 0
        while True:
            if base + window >= len(text):
                return ids + self._tok.encode(text[base:], add_special_tokens=False).ids, True
            enc = self._tok.encode(text[base:base + window], add_special_tokens=False)
            limit = window - _MARGIN
            n, start = _settled(enc, limit)
            got = ids + enc.ids[:n]
            if self._kind == "Unigram" and start is not None and len(got) < need:
                got += self._converged(enc, n, limit, need - len(got), window >= _MAX_WINDOW)
            if len(got) >= need:
                return got, False
            if self._kind == "WordPiece":
                if start is None:  # nothing unsettled: restart after the margin
                    ids, base = got, base + limit
                    continue
                if start > 0:
                    ids, base = got, base + start
                    continue
                if self._huge_word(text, base, enc, window):  # one [UNK], then after the word
                    end = self._word_end(text, base + enc.offsets[0][1] - 1)
                    ids, base = got + [self._unk], end
                    continue
            if window >= _MAX_WINDOW:  # point 5 of the module docstring
                raise UnsettledWord()
            window = min(2 * window, _MAX_WINDOW)

    def _huge_word(self, text: str, base: int, enc: Encoding, window: int) -> bool:
        """Whether the window is one word (no word after its first) longer than WordPiece's
        max_input_chars_per_word after normalization: [UNK] however it goes on."""
        if enc.ids != [self._unk]:  # one token: one word
            return False
        s = enc.offsets[0][0]
        normalizer = self._tok.normalizer
        word = text[base + s:base + window]
        return len(normalizer.normalize_str(word) if normalizer else word) > self._max_word_chars

    def _word_end(self, text: str, inside: int) -> int:
        """Where the (BERT) word holding character `inside` ends, scanning chunk by chunk."""
        while True:  # text[inside] is a word character, so the chunk's first word is the rest
            jump = _MAYBE_BERT_BOUNDARY.search(text, inside + 1)
            if jump is None:  # letters and digits to the end: all one word
                return len(text)
            inside = jump.start() - 1
            enc = self._tok.encode(text[inside:inside + _SCAN_CHUNK], add_special_tokens=False)
            n, _ = _settled(enc, _SCAN_CHUNK - _MARGIN)
            first_end = enc.offsets[_group_end(enc.word_ids, 0) - 1][1]
            if n > 0 or inside + _SCAN_CHUNK >= len(text):
                return inside + first_end
            inside += first_end - 1

    def _converged(self, enc: Encoding, n: int, limit: int, want: int,
                   last: bool) -> list[int]:
        """Unigram: the first tokens of the whole text's word that starts at token n (the
        first unsettled one), if at least `want` are settled (module docstring, point 4),
        else []. Tries just past the window's `want`-th token, and the most the window
        holds if `last`."""
        model, longest, unknown = self._unigram  # type: ignore[misc]
        tokens, offsets, ids = enc.tokens, enc.offsets, enc.ids
        j, end = n, _group_end(enc.word_ids, n)
        while j < end and offsets[j][1] <= limit:
            j += 1
        if unknown.intersection(ids[n:j]) - {self._unk}:  # byte pieces: not the word's text
            return []
        word = "".join(tokens[n:j])  # the start of the whole text's (normalized) word
        top = len(word) - longest + 1
        guess = len("".join(tokens[n:n + want + _CONVERGE_SLACK]))
        for x in sorted({min(guess, top), top} if last else {min(guess, top)}):
            if x >= 1 and (settled := _common_prefix(model, word, x, longest, unknown, want)):
                return settled
        return []

    def limited(self, max_tokens: int | None) -> "TextTokenizer":
        """This tokenizer, cutting at `max_tokens` where that is lower (a request's limit)."""
        if max_tokens is None or max_tokens >= self.max_tokens:
            return self
        cut = copy.copy(self)
        cut.max_tokens = max_tokens
        return cut

    def encode(self, texts: list[str]) -> Tokenized:
        keep = self.max_tokens - 1 - len(self._prefix)  # content tokens a truncated text keeps
        if self._kind is None or keep < 1:
            full = [e.ids for e in self._encode_all(texts, True)]
        else:
            full = [self._prefix + c + self._suffix for c, _ in self._heads(texts, keep + 1)]
        ids, lengths = [], []
        for tokens in full:
            arr = np.asarray(tokens, dtype=np.int64)
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
        heads = self._heads if self._kind is not None else \
            (lambda texts, _: [(e.ids, True) for e in self._encode_all(texts, False)])
        # beyond `max_tokens - specials` tokens the count of `first` is a lower bound (refused)
        try:
            a = np.asarray(heads([first], self.max_tokens - t.num_specials + 1)[0][0], np.int64)
        except UnsettledWord as e:
            e.index = None
            raise
        fixed = len(a) + t.num_specials
        room = max(self.max_tokens - fixed, 0)
        (pre, mid, suf), (tpre, tmid, tsuf) = t.parts, t.part_types
        head = np.concatenate([pre, a, mid])
        head_types = np.concatenate([tpre, np.full(len(a), t.type_a, np.int64), tmid])
        ids, types, lengths = [], [], []
        for content, _ in heads(seconds, room + 1):
            b = np.asarray(content, dtype=np.int64)
            lengths.append(fixed + len(b))
            b = b[:room]
            ids.append(np.concatenate([head, b, suf]))
            types.append(np.concatenate([head_types, np.full(len(b), t.type_b, np.int64), tsuf]))
        return fixed, Tokenized(ids, lengths, types)



def _group_end(words: list, i: int) -> int:
    """The index after the last token of the pre-token holding token i (`words`: word ids)."""
    j = i + 1
    if words[i] is not None:
        while j < len(words) and words[j] == words[i]:
            j += 1
    return j


def _settled(enc: Encoding, limit: int) -> tuple[int, int | None]:
    """(how many leading tokens belong to pre-tokens ending by character `limit`, where the
    first other pre-token starts or None)."""
    i, offsets, words = 0, enc.offsets, enc.word_ids  # each property access builds a list
    while i < len(offsets):
        j = _group_end(words, i)
        if offsets[j - 1][1] > limit:
            return i, offsets[i][0]
        i = j
    return i, None


def _common_prefix(model: Tokenizer, word: str, x: int, longest: int, unknown: set[int],
                   want: int) -> list[int]:
    """The ids that the best paths of word[:b], for every b in [x, x + longest), begin with,
    less a trailing unknown piece (which the rest of the word may extend); [] if fewer than
    `want` (found early: each path can only shorten what they share)."""
    common: set[int] | None = None
    for b in range(x, x + longest):
        path = model.encode(word[:b], add_special_tokens=False)
        ends = [e for _, e in path.offsets]
        if common is None:
            first_ids, first_ends, common = path.ids, ends, set(ends)
        else:
            common.intersection_update(ends)
        node = max(common, default=0)  # the last node on every path so far
        ids = first_ids[:bisect.bisect_right(first_ends, node)]
        while ids and ids[-1] in unknown:  # a fused [UNK] or its byte pieces may go on
            ids.pop()
        if len(ids) < want:
            return []
    return ids
