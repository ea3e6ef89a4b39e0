"""Unigram: the first tokens of a text that ends in a huge word repeating a short unit.

The best paths through such a word never meet (XLM-R reads "▁" + "a" * k from "▁a", "a", "a"
or from "▁", "aaaa" as k % 5 says), so no window settles them (tokenizer.py, point 5). They
are found exactly from a shorter copy of the text, tokenized whole, when all of this holds
(W: the whole text's normalized word; W': the copy's, with fewer repeats):

1. Exact sums. Every character of W is a piece (no [UNK] candidates) and the scores of the
   pieces in W are multiples of 2**-j with len(W) * max|score| < 2**(53 - j): then every
   float64 sum the Viterbi makes is exact, and its choices are those of exact arithmetic.
2. A periodic state. W' is q-periodic on [a, z). Write S(n) for the best score to node n,
   from the model's best path to n (a run on W'[:n]). If the last m scores relative to S(n)
   are the same at n0 and n0 + P (P a multiple of q, n0 - m >= a), they stay P-periodic as
   long as the text is (each step depends on them and on the last m characters only), so
   a node n in (n0, z] has its best last piece start at n - d(n mod P).
3. Same tracebacks. W is W' with D more characters of the repetition (normalization is
   local, tokenizer.py point 2, so more units in the text are more copies inside W; D =
   extra units * characters per unit, checked on two copies), and D is a multiple of P: so
   after the repetition both read the same text from the same state, and their tracebacks
   reach the zone (n0, z] at the same node (W's D further on). In the zone each step goes
   from residue r (mod P) to r - d(r): the residues cycle, moving back C characters per
   cycle, and if D is a multiple of C, W's traceback after its extra cycles stands where
   the copy's does after its first repeated residue. From there down the two are one path:
   the copy's tokens up to that node are W's.

The copy keeps the text up to the repetition plus enough of it; anything else (a unit over
`_UNIT_MAX` characters, a repetition that does not run to the text's end, a long prefix
before it in the word, no periodic state within `_STATE_PERIOD_MAX`) gives None: refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

_UNIT_MAX = 32  # raw characters in the repeated unit
_PROBE = 4096  # characters at the end of the text that must repeat
_CHUNK = 1 << 16  # characters compared per step when finding where the repetition starts
_PREFIX_MAX = 1 << 15  # normalized characters of the word before its repetition
_STATE_PERIOD_MAX = 64  # normalized characters
_INSIDE = 128  # characters of the word kept before the repeats that the copy drops
_SPARE = 8192  # characters of repetition in the copy beyond what the wanted tokens take


@dataclass(frozen=True)
class _Reading:
    before: list[int]  # ids of the words before the huge one
    trusted: list[int]  # the word's first ids, those the whole text has too
    word: str  # the copy's normalized word
    cycle: int  # C of point 3
    exact_up_to: int  # the longest word for which point 1 holds


def repeated_tail(tok: Tokenizer, model: Tokenizer, scores: np.ndarray, longest: int,
                  text: str, word_start: int, need: int) -> list[int] | None:
    """The first `need` (or more) ids of `text`, whose last word starts at `word_start` and
    ends the text in a repetition; None where the module docstring's points do not hold.
    `tok` is the whole tokenizer, `model` its model alone, `scores` the pieces' by id."""
    run = _repetition(text)
    if run is None:
        return None
    s, p = run
    s0 = s + -(-max(0, word_start + _INSIDE - s) // p) * p  # well inside the word
    if s0 - word_start > _PREFIX_MAX:
        return None
    r = (len(text) - s0) // p
    head, unit, tail = text[:s0], text[s0:s0 + p], text[s0 + r * p:]
    r0 = -(-(need * longest + _SPARE) // p)
    if r <= r0 + 1:  # no longer than the copy would be: tokenized whole
        return tok.encode(text, add_special_tokens=False).ids
    copy = lambda k: head + unit * k + tail  # noqa: E731
    one, two = (_read(tok, model, scores, longest, copy(k), word_start) for k in (r0, r0 + 1))
    if one is None or two is None:
        return None
    per_unit = len(two.word) - len(one.word)  # normalized characters per unit
    mid = len(one.word) // 2
    if per_unit <= 0 or two.word != one.word[:mid] + one.word[mid:mid + per_unit] + \
            one.word[mid:]:
        return None
    k = r0 + (r - r0) % (one.cycle // math.gcd(one.cycle, per_unit))
    best = _read(tok, model, scores, longest, copy(k), word_start)
    extra = (r - k) * per_unit  # D of point 3
    if best is None or extra % best.cycle or len(best.word) + extra > best.exact_up_to:
        return None
    got = best.before + best.trusted
    return got if len(got) >= need else None


def _repetition(text: str) -> tuple[int, int] | None:
    """(where it starts, unit length) of the repetition that ends `text`, if any."""
    if len(text) < 2 * _PROBE:
        return None
    end = text[-_PROBE:]
    p = next((p for p in range(1, _UNIT_MAX + 1) if text[-_PROBE - p:-p] == end), None)
    if p is None:
        return None
    i = len(text) - _PROBE - p  # text[k] == text[k + p] for every k >= i
    while i > 0:
        c = min(_CHUNK, i)
        if text[i - c:i] == text[i - c + p:i + p]:
            i -= c
            continue
        while text[i - 1] == text[i - 1 + p]:  # the chunk holds a difference
            i -= 1
        break
    return i, p


def _read(tok: Tokenizer, model: Tokenizer, scores: np.ndarray, longest: int,
          text: str, word_start: int) -> _Reading | None:
    """Points 1 to 3 on one copy (tokenized whole)."""
    enc = tok.encode(text, add_special_tokens=False)
    words, offsets = enc.word_ids, enc.offsets
    g = len(words) - 1
    while g > 0 and words[g - 1] == words[-1]:
        g -= 1
    pieces = enc.tokens[g:]
    w = "".join(pieces)
    if offsets[g][0] != word_start or any(model.token_to_id(c) is None for c in set(w)):
        return None  # not one word from the huge word's start to the end; or [UNK]s
    a = len(w) // 2
    q = next((q for q in range(1, _STATE_PERIOD_MAX + 1)
              if w[a:a + _PROBE] == w[a + q:a + q + _PROBE]), None)
    if q is None:
        return None
    while a > 0 and w[a - 1] == w[a - 1 + q]:
        a -= 1
    z = len(w) // 2 + _PROBE + q
    while z < len(w) and w[z] == w[z - q]:
        z += 1  # w[i] == w[i + q] for a <= i < z - q
    if a > _PREFIX_MAX:
        return None
    # point 1: the pieces that occur in w (its periodic part repeats those near a)
    found = {t: float(scores[i]) for t in {
        w[i:i + n] for i in [*range(min(len(w), a + q + longest)),
                             *range(max(0, z - q - longest), len(w))]
        for n in range(1, longest + 1)} if (i := model.token_to_id(t)) is not None}
    j = max(v.as_integer_ratio()[1] for v in found.values()).bit_length() - 1
    top = max(abs(v) for v in found.values())
    exact_up_to = int(2 ** (53 - j) / top) if top else len(w) ** 2
    fixed = {t: int(v * 2 ** j) for t, v in found.items()}
    # point 2
    best: dict[int, int] = {}

    def score(n: int) -> int:
        if n not in best:
            best[n] = sum(fixed[t] for t in model.encode(w[:n], add_special_tokens=False).tokens)
        return best[n]

    def state(n: int) -> tuple[int, ...]:
        return tuple(score(n - i) - score(n) for i in range(1, longest + 1))

    period = n0 = None
    for n0 in (a + longest, a + longest + 256, a + longest + 2048):
        if n0 + _STATE_PERIOD_MAX > z:
            break
        s0 = state(n0)
        period = next((P for P in range(q, _STATE_PERIOD_MAX + 1, q)
                       if state(n0 + P) == s0), None)
        if period is not None:
            break
    if period is None or n0 is None:
        return None
    # point 3: the traceback's residues in the zone, from the top, up to the first repeat
    ends, at = [], 0
    for t in pieces:
        at += len(t)
        ends.append(at)
    seen: dict[int, int] = {}
    for e in reversed(ends):
        if n0 < e <= z:
            if e % period in seen:
                cut = seen[e % period]
                trusted = enc.ids[g:g + sum(x <= cut for x in ends)]
                return _Reading(enc.ids[:g], trusted, w, cut - e, exact_up_to)
            seen[e % period] = e
    return None
