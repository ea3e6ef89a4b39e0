"""Scoring a query against items: options, and the scores computed from encoded outputs.

Two ways to score, chosen by the model (`EncoderModel.pair_scoring`):
- pair scoring (cross-encoders): every (query, item) pair is one sequence through the model;
  the model's head gives one logit per pair, the activation here turns it into the score;
- embedding scoring (BGE-M3, CLIP, decoder embedders): the query (once) and the items are
  encoded through the same scheduler, then compared here with numpy, as SIE's BGE-M3 score
  (`adapters/bge_m3_score_mixin.py`) defines the modes: `dense` = dot of the normalised
  vectors, `sparse` = sum over shared token ids of w_q * w_d, `colbert` = MaxSim over the
  multivector output (per query vector the best dot with the item's vectors, averaged over
  query vectors), `hybrid` = the weighted SUM of the three with `score_weights` (default
  dense 0.4, sparse 0.2, colbert 0.4); an output whose weight is 0 is not computed.

`score_type` (values dense, sparse, multivector = colbert, hybrid) is accepted as an older
name of `score_mode`; the older `weights` (a weighted mean keyed `multivector`) is refused,
naming `score_weights`, since the same numbers would now mean a sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidRequest
from .options import check_lengths, check_options
from .request import ItemResult

SCORE_MODES = ("dense", "sparse", "colbert", "hybrid")
# the encode output each mode compares
MODE_OUTPUTS = {"dense": "dense", "sparse": "sparse", "colbert": "multivector"}
DEFAULT_WEIGHTS = {"dense": 0.4, "sparse": 0.2, "colbert": 0.4}
SCORE_TYPE_ALIASES = {"dense": "dense", "sparse": "sparse", "multivector": "colbert",
                      "hybrid": "hybrid"}
ACTIVATIONS = ("sigmoid", "none")
# The ColBERT similarity matrix is built in chunks of at most this many floats.
_MAXSIM_CHUNK = 1 << 24


@dataclass(frozen=True)
class ScoreOptions:
    truncate: bool = True
    score_mode: str | None = None  # None: the model's default (its first score mode)
    score_weights: dict[str, float] | None = None  # DEFAULT_WEIGHTS with the request's keys
    activation: str | None = None  # cross-encoders; None: the model's/catalog's own
    instruction: str | None = None  # LLM rerankers: the task; embedders: for the query
    lora_id: str | None = None
    timeout_s: float | None = None
    max_seq_length: int | None = None  # as in encode (engine.EncodeOptions): ColBERT, SPLADE
    query_max_length: int | None = None
    # embedders: encode's options for the query and the items (engine.EncodeOptions), as
    # SIE's bi-encoder score passes its options to encode (adapters/bge_m3_score_mixin.py)
    query_template: str | None = None
    doc_template: str | None = None
    pooling: str | None = None
    default_instruction: str | None = None
    normalize: bool | None = None

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> "ScoreOptions":
        """Validate a score request's options; errors are SIE's words for SIE's options."""
        kinds = {"truncate": bool, "score_mode": object, "score_weights": object,
                 "score_type": str, "weights": object, "activation": str,
                 "instruction": str, "lora_id": str, "timeout_s": (int, float),
                 "max_seq_length": int, "query_max_length": int, "query_template": str,
                 "doc_template": str, "pooling": str, "default_instruction": str,
                 "normalize": bool}
        options = dict(check_options(check_lengths(options, "options"), kinds, "options"))
        if options.get("activation") is not None and options["activation"] not in ACTIVATIONS:
            raise InvalidRequest(f"options.activation must be one of {', '.join(ACTIVATIONS)}")
        if options.pop("weights", None) is not None:
            raise InvalidRequest("options.weights is now options.score_weights, keyed dense, "
                                 "sparse and colbert, and SIE's hybrid score is their weighted "
                                 "sum (no longer the weighted mean)")
        mode = _score_mode(options.get("score_mode"), options.pop("score_type", None))
        weights = _score_weights(options.get("score_weights"))
        if mode == "hybrid" and weights is not None and sum(weights.values()) <= 0:
            raise InvalidRequest("score_weights for hybrid mode must contain at least one "
                                 "positive weight")
        return cls(**{**{k: v for k, v in options.items() if v is not None},
                      "score_mode": mode, "score_weights": weights})

    def check(self, model_name: str, score_modes: tuple[str, ...], pair_scoring: bool) -> str:
        """Check the options against the model; return the score mode that ranks."""
        mode = self.score_mode or score_modes[0]
        if mode not in score_modes:
            raise InvalidRequest(f"options.score_mode: {mode!r} is not offered by "
                                 f"{model_name} (it offers {', '.join(score_modes)})")
        if self.score_weights is not None and "hybrid" not in score_modes:
            raise InvalidRequest(f"options.score_weights: {model_name} has no hybrid score "
                                 "to weight")
        if self.activation is not None and not pair_scoring:
            raise InvalidRequest(f"options.activation applies to cross-encoders, not to "
                                 f"{model_name}")
        return mode

    @property
    def weights(self) -> dict[str, float]:
        return self.score_weights or DEFAULT_WEIGHTS

    def outputs(self, mode: str) -> tuple[str, ...]:
        """The encode outputs `mode` compares (hybrid: those weighted above 0)."""
        if mode == "hybrid":
            return tuple(MODE_OUTPUTS[m] for m in MODE_OUTPUTS if self.weights[m] > 0)
        return (MODE_OUTPUTS.get(mode, mode),)


def _score_mode(mode: Any, alias: str | None) -> str | None:
    """`score_mode` (SIE's message for a bad one), or the older `score_type` mapped to it."""
    if mode is not None and (not isinstance(mode, str) or mode not in SCORE_MODES):
        raise InvalidRequest(f"Invalid score_mode '{mode}'. Expected one of "
                             f"{sorted(SCORE_MODES)}.")
    if alias is None:
        return mode
    if alias not in SCORE_TYPE_ALIASES and alias != "relevance":
        raise InvalidRequest(f"options.score_type: {alias[:64]!r} is not a score type (use "
                             f"options.score_mode: one of {', '.join(SCORE_MODES)})")
    mapped = SCORE_TYPE_ALIASES.get(alias, alias)
    if mode is not None and mode != mapped:
        raise InvalidRequest(f"options.score_type {alias!r} and options.score_mode {mode!r} "
                             "disagree; send options.score_mode only")
    return mapped


def _score_weights(value: Any) -> dict[str, float] | None:
    """SIE's `score_weights`: DEFAULT_WEIGHTS with the request's keys replaced."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("score_weights must be a mapping of {dense, sparse, colbert} -> float")
    unknown = [k for k in value if k not in DEFAULT_WEIGHTS]
    if unknown:
        shown = sorted(str(k)[:64] for k in unknown)
        raise InvalidRequest(f"Unknown score_weights keys: {shown}. Allowed: dense, sparse, colbert")
    for key, weight in value.items():
        if not _finite_weight(weight):
            raise InvalidRequest(f"score_weights['{key}'] must be a non-negative number, "
                                 f"got {repr(weight)[:64]}")
    return {**DEFAULT_WEIGHTS, **{k: float(w) for k, w in value.items()}}


def _finite_weight(value: Any) -> bool:
    """A number >= 0 that is finite as a float (bools, NaN, inf and huge ints are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:
        return False


@dataclass
class ScoreResult:
    """Scores of every item against the query, and the ranking by `score_mode`."""

    score_mode: str
    scores: np.ndarray  # (N,) float32, the score that ranks, in item order
    order: np.ndarray  # item indices, best first, cut to top_k
    components: dict[str, np.ndarray] = field(default_factory=dict)  # every score computed
    score_weights: dict[str, float] | None = None  # hybrid: the weights used
    activation: str | None = None  # cross-encoders: the activation applied to the logits
    input_tokens: int = 0  # tokens the model saw for this request (query included)


def rank(scores: np.ndarray, top_k: int | None) -> np.ndarray:
    """Item indices by descending score (ties keep item order; NaN last), cut to top_k."""
    order = np.argsort(-scores, kind="stable")
    return order if top_k is None else order[:top_k]


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    if activation == "sigmoid":  # 1 / (1 + e^-x) without overflow
        return np.exp(-np.logaddexp(0.0, -logits.astype(np.float64))).astype(np.float32)
    return logits.astype(np.float32)


def pair_scores(results: list[ItemResult], activation: str, top_k: int | None) -> ScoreResult:
    """Cross-encoder: one logit per pair -> scores."""
    scores = activate(np.fromiter((r.score for r in results), np.float32, len(results)),
                      activation)
    return ScoreResult("relevance", scores, rank(scores, top_k), activation=activation,
                       input_tokens=sum(r.token_count for r in results))


def embedding_scores(query: ItemResult, items: list[ItemResult], mode: str,
                     weights: dict[str, float], top_k: int | None) -> ScoreResult:
    """The `mode` score of items against the query (hybrid: the weighted sum of the modes
    weighted above 0, each also kept in `components`)."""
    modes = [m for m in MODE_OUTPUTS if weights[m] > 0] if mode == "hybrid" else [mode]
    out: dict[str, np.ndarray] = {}
    for m in modes:
        if m == "dense":
            out[m] = dense_scores(query.dense, [r.dense for r in items])
        elif m == "sparse":
            out[m] = sparse_scores(query.sparse, [r.sparse for r in items])
        else:
            out[m] = maxsim_scores(query.multivector, [r.multivector for r in items])
    used = None
    if mode == "hybrid":
        used = dict(weights)
        total = np.zeros(len(items), np.float64)
        for m in modes:
            total += weights[m] * out[m].astype(np.float64)
        out["hybrid"] = total.astype(np.float32)
    scores = out[mode]
    tokens = query.token_count + sum(r.token_count for r in items)
    return ScoreResult(mode, scores, rank(scores, top_k), out, used, input_tokens=tokens)


def dense_scores(q: np.ndarray, docs: list[np.ndarray]) -> np.ndarray:
    return (np.stack(docs) @ q).astype(np.float32)


def sparse_scores(q: tuple[np.ndarray, np.ndarray],
                  docs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """sum over ids in both of w_q * w_d, for every doc at once."""
    n = len(docs)
    q_idx, q_val = q
    sort = np.argsort(q_idx, kind="stable")
    q_idx, q_val = q_idx[sort], q_val[sort]
    counts = np.fromiter((len(d[0]) for d in docs), np.int64, n)
    if len(q_idx) == 0 or counts.sum() == 0:
        return np.zeros(n, np.float32)
    idx = np.concatenate([d[0] for d in docs])
    val = np.concatenate([d[1] for d in docs])
    owner = np.repeat(np.arange(n), counts)
    pos = np.minimum(np.searchsorted(q_idx, idx), len(q_idx) - 1)
    hit = q_idx[pos] == idx
    prod = val[hit].astype(np.float32) * q_val[pos[hit]].astype(np.float32)
    return np.bincount(owner[hit], weights=prod, minlength=n).astype(np.float32)


def maxsim_scores(q: np.ndarray, docs: list[np.ndarray]) -> np.ndarray:
    """ColBERT: mean over query vectors of the max dot product with the doc's vectors."""
    n = len(docs)
    out = np.zeros(n, np.float32)
    if len(q) == 0:
        return out
    counts = np.fromiter((len(d) for d in docs), np.int64, n)
    start = 0
    while start < n:  # chunks of docs whose similarity matrix stays under _MAXSIM_CHUNK floats
        end, rows = start, 0
        while end < n and (end == start or (rows + counts[end]) * len(q) <= _MAXSIM_CHUNK):
            rows += counts[end]
            end += 1
        part = [i for i in range(start, end) if counts[i] > 0]
        if part:
            sims = np.concatenate([docs[i] for i in part]) @ q.T  # (rows, nq)
            offsets = np.concatenate([[0], np.cumsum(counts[part])[:-1]])
            out[part] = np.maximum.reduceat(sims, offsets, axis=0).mean(axis=1)
        start = end
    return out
