"""MUVERA fixed-dimensional encodings (FDE) of multivectors (Jayaram et al. 2024,
arXiv:2405.19504), with the settings and random draws of SIE's `MuveraPostprocessor`, so the
same settings and seed give SIE's vectors.

For each repetition r (random structures seeded `seed + r`, numpy's default_rng):
1. SimHash: the tokens times a (dim x k) standard-normal matrix; the signs of the k values,
   read as a Gray code (bit by bit: p = 2p + (bit xor (p & 1))), pick one of 2^k partitions;
2. each token is projected: unchanged (`projection_dim` None) or by an AMS sketch (each input
   coordinate goes to one of `projection_dim` outputs with a random sign);
3. per partition the projected tokens are summed (queries) or averaged (documents); an empty
   partition stays zero.
The repetitions are concatenated; `final_projection_dim` (if below that size) count-sketches
the result (seed `seed`), `normalize` L2-normalises it, `center_tokens` subtracts the mean
token first. A query FDE dotted with a document FDE approximates their Chamfer (MaxSim sum).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .errors import InvalidRequest, shown

# Bounds that keep one request's work and memory modest.
MAX_INTERMEDIATE = 1 << 23  # floats of the concatenated repetitions, per item
MAX_OUTPUT = 1 << 18  # floats of the encoding
MAX_PROJECTIONS = 16


@dataclass(frozen=True)
class MuveraConfig:
    """SIE's `muvera_config` keys and defaults (the paper's recommended setting)."""

    num_repetitions: int = 40
    num_simhash_projections: int = 6
    projection_dim: int | None = None  # None: tokens are not projected
    final_projection_dim: int | None = 10240  # None, or >= the concatenation: no count sketch
    seed: int = 42
    normalize: bool = False
    center_tokens: bool = False

    @classmethod
    def parse(cls, values: Any, field: str) -> "MuveraConfig":
        """Settings from a dict of SIE's keys; errors name `field.key`."""
        if not isinstance(values, dict):
            raise InvalidRequest(f"{field} must be an object")
        known = {f.name for f in fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise InvalidRequest(f"{field}.{shown(key)} is not a MUVERA setting "
                                     f"(known: {', '.join(sorted(known))})")
            if key in ("normalize", "center_tokens"):
                if not isinstance(value, bool):
                    raise InvalidRequest(f"{field}.{key} must be a boolean")
            elif key in ("projection_dim", "final_projection_dim") and value is None:
                continue
            elif isinstance(value, bool) or not isinstance(value, int) or value < (
                    0 if key == "seed" else 1):
                raise InvalidRequest(f"{field}.{key} must be an integer >= "
                                     f"{0 if key == 'seed' else 1}")
        config = cls(**values)
        if config.num_simhash_projections > MAX_PROJECTIONS:
            raise InvalidRequest(f"{field}.num_simhash_projections must be at most "
                                 f"{MAX_PROJECTIONS}")
        if config.seed >= 1 << 63:
            raise InvalidRequest(f"{field}.seed must be below 2^63")
        return config

    def intermediate_dim(self, token_dim: int) -> int:
        return self.num_repetitions * (1 << self.num_simhash_projections) * (
            self.projection_dim or token_dim)

    def sketch_dim(self, token_dim: int) -> int | None:
        """The count sketch's size, or None when there is none (a sketch that does not reduce
        only loses information, so SIE skips it)."""
        final = self.final_projection_dim
        return final if final is not None and final < self.intermediate_dim(token_dim) else None

    def output_dim(self, token_dim: int) -> int:
        return self.sketch_dim(token_dim) or self.intermediate_dim(token_dim)

    def check(self, token_dim: int, field: str) -> None:
        """Refuse settings whose encoding of `token_dim`-wide tokens would be too large."""
        if self.intermediate_dim(token_dim) > MAX_INTERMEDIATE:
            raise InvalidRequest(f"{field}: {self.intermediate_dim(token_dim):,} floats before "
                                 f"the final projection; at most {MAX_INTERMEDIATE:,}")
        if self.output_dim(token_dim) > MAX_OUTPUT:
            raise InvalidRequest(f"{field}: an encoding of {self.output_dim(token_dim):,} floats; "
                                 f"at most {MAX_OUTPUT:,} (set final_projection_dim)")


@dataclass(frozen=True)
class _Draws:
    simhash: tuple[np.ndarray, ...]  # per repetition, the (dim, k) Gaussian matrix
    ams: tuple[np.ndarray, ...]  # per repetition, the (dim, projection_dim) AMS sketch
    sketch: tuple[np.ndarray, np.ndarray] | None  # count sketch: bucket and sign per input


@functools.lru_cache(maxsize=4)
def _draws(config: MuveraConfig, token_dim: int) -> _Draws:
    """The random structures, drawn in the order and with the calls SIE makes."""
    k = config.num_simhash_projections
    signs = np.array([-1.0, 1.0], dtype=np.float32)
    mats, ams = [], []
    for r in range(config.num_repetitions):
        g = np.random.default_rng(config.seed + r)
        mats.append(g.normal(0.0, 1.0, size=(token_dim, k)).astype(np.float32))
        if config.projection_dim is not None:
            g = np.random.default_rng(config.seed + r)
            coords = g.integers(0, config.projection_dim, size=token_dim)
            m = np.zeros((token_dim, config.projection_dim), dtype=np.float32)
            m[np.arange(token_dim), coords] = g.choice(signs, size=token_dim)
            ams.append(m)
    sketch = None
    final = config.sketch_dim(token_dim)
    if final is not None:
        g = np.random.default_rng(config.seed)
        size = config.intermediate_dim(token_dim)
        sketch = (g.integers(0, final, size=size).astype(np.int32), g.choice(signs, size=size))
    return _Draws(tuple(mats), tuple(ams), sketch)


def encode(tokens: np.ndarray, config: MuveraConfig, is_query: bool) -> np.ndarray:
    """The FDE of one multivector (tokens x dim): summed partitions for a query, averaged
    for a document. No tokens: zeros."""
    n, dim = tokens.shape
    out_dim = config.output_dim(dim)
    if n == 0:
        return np.zeros(out_dim, dtype=np.float32)
    tokens = tokens.astype(np.float32, copy=False)
    if config.center_tokens:
        tokens = tokens - tokens.mean(axis=0, keepdims=True)
    draws = _draws(config, dim)
    parts = 1 << config.num_simhash_projections
    width = config.projection_dim or dim
    blocks = []
    for r, hyperplanes in enumerate(draws.simhash):
        # one product per repetition, as SIE computes it: a sign near 0 stays the same
        bits = (tokens @ hyperplanes > 0).astype(np.int64)
        index = np.zeros(n, dtype=np.int64)
        for b in range(bits.shape[1]):  # Gray code, most significant bit first
            index = (index << 1) + (bits[:, b] ^ (index & 1))
        x = tokens if config.projection_dim is None else tokens @ draws.ams[r]
        sums = np.zeros((parts, width), dtype=np.float32)
        np.add.at(sums, index, x)
        if not is_query:
            counts = np.bincount(index, minlength=parts)
            filled = counts > 0
            sums[filled] /= counts[filled, None]
        blocks.append(sums.ravel())
    fde = np.concatenate(blocks)
    if draws.sketch is not None:
        bucket, sign = draws.sketch
        fde = np.bincount(bucket, weights=sign * fde, minlength=out_dim).astype(np.float32)
    if config.normalize:
        norm = np.linalg.norm(fde)
        if norm > 0:
            fde = fde / norm
    return fde.astype(np.float32, copy=False)
