"""Scoring a query against items: options, and the scores computed from encoded outputs.

Two ways to score, chosen by the model (`EncoderModel.pair_scoring`):
- pair scoring (cross-encoders): every (query, item) pair is one sequence through the model;
  the model's head gives one logit per pair, the activation here turns it into the score;
- embedding scoring (BGE-M3): the query (once) and the items are encoded through the same
  scheduler, then compared here with numpy: dense = dot of the normalised vectors, sparse =
  sum over shared token ids of w_q * w_d, multivector = ColBERT MaxSim (per query vector the
  best dot with the item's vectors, averaged over query vectors), hybrid = the weighted mean
  of the three (FlagEmbedding's `compute_score` "colbert+sparse+dense").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidRequest, shown
from .options import check_options
from .request import ItemResult

COMPONENTS = ("dense", "sparse", "multivector")
DEFAULT_WEIGHTS = {"dense": 0.4, "sparse": 0.2, "multivector": 0.4}
ACTIVATIONS = ("sigmoid", "none")
# The ColBERT similarity matrix is built in chunks of at most this many floats.
_MAXSIM_CHUNK = 1 << 24


@dataclass(frozen=True)
class ScoreOptions:
    truncate: bool = True
    score_type: str | None = None  # None: the model's default (its first score type)
    weights: dict[str, float] | None = None  # hybrid weights; None: DEFAULT_WEIGHTS
    activation: str | None = None  # cross-encoders; None: the model's/catalog's own
    instruction: str | None = None  # LLM rerankers: the task; embedders: for the query
    lora_id: str | None = None
    timeout_s: float | None = None

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> "ScoreOptions":
        """Validate a score request's options; errors name the offending field."""
        kinds = {"truncate": bool, "score_type": str, "weights": dict, "activation": str,
                 "instruction": str, "lora_id": str, "timeout_s": (int, float)}
        options = check_options(options, kinds, "options")
        if options.get("activation") is not None and options["activation"] not in ACTIVATIONS:
            raise InvalidRequest(f"options.activation must be one of {', '.join(ACTIVATIONS)}")
        weights = options.get("weights")
        if weights is not None:
            for key, value in weights.items():
                if key not in COMPONENTS:
                    raise InvalidRequest(f"options.weights.{shown(key)} is not a score "
                                         f"component (known: {', '.join(COMPONENTS)})")
                if not _finite_weight(value):
                    raise InvalidRequest(f"options.weights.{key} must be a finite number >= 0")
            weights = {k: float(weights.get(k, 0.0)) for k in COMPONENTS}
            if max(weights.values()) <= 0:
                raise InvalidRequest("options.weights must have at least one weight above 0")
        return cls(**{**{k: v for k, v in options.items() if v is not None}, "weights": weights})

    def check(self, model_name: str, score_types: tuple[str, ...], pair_scoring: bool) -> str:
        """Check the options against the model; return the score type that ranks."""
        score_type = self.score_type or score_types[0]
        if score_type not in score_types:
            raise InvalidRequest(f"options.score_type: {score_type!r} is not offered by "
                                 f"{model_name} (it offers {', '.join(score_types)})")
        if self.weights is not None and "hybrid" not in score_types:
            raise InvalidRequest(f"options.weights: {model_name} has no hybrid score to weight")
        if self.activation is not None and not pair_scoring:
            raise InvalidRequest(f"options.activation applies to cross-encoders, not to "
                                 f"{model_name}")
        return score_type


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
    """Scores of every item against the query, and the ranking by `score_type`."""

    score_type: str
    scores: np.ndarray  # (N,) float32, the score that ranks, in item order
    order: np.ndarray  # item indices, best first, cut to top_k
    components: dict[str, np.ndarray] = field(default_factory=dict)  # every score computed
    weights: dict[str, float] | None = None  # the hybrid weights used
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


def embedding_scores(query: ItemResult, items: list[ItemResult], score_type: str,
                     components: tuple[str, ...], weights: dict[str, float] | None,
                     top_k: int | None) -> ScoreResult:
    """Dense, sparse, multivector and (weighted) hybrid scores of items against the query."""
    out: dict[str, np.ndarray] = {}
    if "dense" in components:
        out["dense"] = dense_scores(query.dense, [r.dense for r in items])
    if "sparse" in components:
        out["sparse"] = sparse_scores(query.sparse, [r.sparse for r in items])
    if "multivector" in components:
        out["multivector"] = maxsim_scores(query.multivector, [r.multivector for r in items])
    used = None
    if score_type == "hybrid" or len(out) == len(COMPONENTS):
        used = weights or DEFAULT_WEIGHTS
        # weights scaled by the largest first: their sum cannot overflow, even near 1e308
        top = max(used[k] for k in out)
        if top <= 0:
            raise InvalidRequest(f"options.weights: no weight above 0 for {', '.join(out)}")
        share = {k: used[k] / top for k in out}
        total = sum(share.values())
        out["hybrid"] = sum(np.float32(share[k] / total) * out[k] for k in out).astype(np.float32)
    scores = out[score_type]
    tokens = query.token_count + sum(r.token_count for r in items)
    return ScoreResult(score_type, scores, rank(scores, top_k), out, used, input_tokens=tokens)


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
