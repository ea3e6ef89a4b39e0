"""`output_dtype`: how float32 results are stored for the client, with SIE's semantics.

Applied after inference, per output type (SIE 0.10.1 `core/postprocessor.py` defines them):

| output_dtype        | dense / multivector rows                         | sparse values |
| ---                 | ---                                              | ---           |
| `float32` (default) | unchanged                                        | unchanged     |
| `float16`           | cast to float16                                  | float16       |
| `int8`              | per row: round(x / max|x| * 127), int8 (0 -> 0s) | float32       |
| `uint8`             | per row: round((x - min) / (max - min) * 255)    | float32       |
| `binary`, `ubinary` | per row: bits of x > 0, packed (np.packbits)     | float32       |

A row is one dense vector or one token vector of a multivector. Sparse indices never change.
"""

from __future__ import annotations

import numpy as np

OUTPUT_DTYPES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")


def quantize_rows(x: np.ndarray, output_dtype: str) -> np.ndarray:
    """Dense vectors or token vectors (last axis = the vector) in `output_dtype`."""
    x = np.asarray(x, dtype=np.float32)
    if output_dtype == "float32":
        return x
    if output_dtype == "float16":
        return x.astype(np.float16)
    if output_dtype == "int8":
        scale = np.abs(x).max(axis=-1, keepdims=True) if x.shape[-1] else np.ones(x.shape[:-1] + (1,))
        scale = np.where(scale == 0, 1, scale)
        return np.round(x / scale * 127).astype(np.int8)
    if output_dtype == "uint8":
        if not x.shape[-1]:
            return x.astype(np.uint8)
        low = x.min(axis=-1, keepdims=True)
        span = x.max(axis=-1, keepdims=True) - low
        span = np.where(span == 0, 1, span)
        return np.round((x - low) / span * 255).astype(np.uint8)
    if output_dtype in ("binary", "ubinary"):
        return np.packbits(x > 0, axis=-1)
    raise ValueError(f"unknown output_dtype {output_dtype!r} (known: {', '.join(OUTPUT_DTYPES)})")


def quantize_sparse_values(values: np.ndarray, output_dtype: str) -> np.ndarray:
    """Sparse weights: float16 when asked for, float32 for every other output_dtype."""
    return np.asarray(values, dtype=np.float16 if output_dtype == "float16" else np.float32)
