"""Engine results as Arrow columns: the one output schema of `sie-server encode` and Ray Data.

| column           | Arrow type                         | from                                   |
| ---              | ---                                | ---                                    |
| `token_count`    | int32                              | tokens the model saw (after truncation) |
| `truncated`      | bool                               | the text was cut to the model's limit  |
| `dense`          | fixed_size_list<T>[D]              | one vector per row                     |
| `sparse_indices` | list<int32>                        | vocabulary ids, ascending as the model returns them |
| `sparse_values`  | list<float32> (float16 for float16) | their weights                          |
| `multivector`    | list<fixed_size_list<T>[D]>        | one vector per token                   |

T is float32, float16, int8 or uint8 per `output_dtype`; `binary` and `ubinary` store packed
bits as uint8 with D = ceil(dim / 8). Quantization is `quantize.py`'s (SIE's semantics).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from .engine.request import ItemResult
from .quantize import OUTPUT_DTYPES, quantize_rows, quantize_sparse_values

OUTPUT_TYPES = ("dense", "sparse", "multivector")

_ARROW = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(),
          "uint8": pa.uint8(), "binary": pa.uint8(), "ubinary": pa.uint8()}


def _check(output_types: Sequence[str], output_dtype: str) -> None:
    unknown = [t for t in output_types if t not in OUTPUT_TYPES]
    if unknown:
        raise ValueError(f"unknown output type(s) {unknown} (known: {', '.join(OUTPUT_TYPES)})")
    if output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"unknown output_dtype {output_dtype!r} (known: {', '.join(OUTPUT_DTYPES)})")


def stored_width(dim: int, output_dtype: str) -> int:
    """Values per stored vector: `dim`, or its packed byte count for binary/ubinary."""
    return (dim + 7) // 8 if output_dtype in ("binary", "ubinary") else dim


def _vector_type(dim: int, output_dtype: str) -> pa.DataType:
    return pa.list_(_ARROW[output_dtype], stored_width(dim, output_dtype))


def schema_for(output_types: Sequence[str], output_dtype: str = "float32",
               dims: Mapping[str, int] | None = None) -> pa.Schema:
    """The columns `to_columns` makes; `dims` gives the float dimension of dense/multivector."""
    _check(output_types, output_dtype)
    dims = dims or {}
    fields = [pa.field("token_count", pa.int32(), nullable=False),
              pa.field("truncated", pa.bool_(), nullable=False)]
    for kind in OUTPUT_TYPES:  # a fixed column order, whatever order the types came in
        if kind not in output_types:
            continue
        if kind == "sparse":
            value = pa.float16() if output_dtype == "float16" else pa.float32()
            fields += [pa.field("sparse_indices", pa.list_(pa.int32()), nullable=False),
                       pa.field("sparse_values", pa.list_(value), nullable=False)]
            continue
        if kind not in dims:
            raise ValueError(f"dims[{kind!r}] is needed for the {kind} column's type")
        vector = _vector_type(dims[kind], output_dtype)
        fields.append(pa.field(kind, vector if kind == "dense" else pa.list_(vector),
                               nullable=False))
    return pa.schema(fields)


def _infer_dims(results: Sequence[ItemResult], output_types: Sequence[str]) -> dict[str, int]:
    dims = {}
    for kind in ("dense", "multivector"):
        if kind in output_types and results:
            first = getattr(results[0], kind)
            if first is not None:
                dims[kind] = int(np.shape(first)[-1])
    return dims


def _offsets(lengths: list[int]) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("more than 2**31 list values in one batch of results; pass fewer results")
    return offsets.astype(np.int32)


def _fixed(flat: np.ndarray, vector: pa.ListType) -> pa.Array:
    values = pa.array(flat.reshape(-1))  # zero-copy (passing type= would copy)
    assert values.type == vector.value_type, (values.type, vector.value_type)
    return pa.FixedSizeListArray.from_arrays(values, type=vector)


def _missing(results: Sequence[ItemResult], kind: str) -> None:
    bad = next(i for i, r in enumerate(results) if getattr(r, kind) is None)
    raise ValueError(f"result {bad} has no {kind} output")


def to_columns(results: Sequence[ItemResult], output_types: Sequence[str],
               output_dtype: str = "float32",
               dims: Mapping[str, int] | None = None) -> dict[str, pa.Array]:
    """One Arrow array per column of `schema_for`, one row per result, in order.

    `dims` is needed only when `results` may be empty; otherwise it is read from the first
    result, and every result must match it."""
    dims = {**_infer_dims(results, output_types), **(dims or {})}
    schema = schema_for(output_types, output_dtype, dims)
    n = len(results)
    cols: dict[str, pa.Array] = {
        "token_count": pa.array(np.fromiter((r.token_count for r in results), np.int32, n)),
        "truncated": pa.array(np.fromiter((r.truncated for r in results), np.bool_, n)),
    }
    if "dense" in output_types:
        vectors = [r.dense for r in results]
        if any(v is None for v in vectors):
            _missing(results, "dense")
        stacked = np.stack(vectors) if n else np.zeros((0, dims["dense"]), np.float32)
        if stacked.shape[1:] != (dims["dense"],):
            raise ValueError(f"dense vectors are {stacked.shape[1:]}, expected ({dims['dense']},)")
        cols["dense"] = _fixed(quantize_rows(stacked, output_dtype), schema.field("dense").type)
    if "sparse" in output_types:
        pairs = [r.sparse for r in results]
        if any(p is None for p in pairs):
            _missing(results, "sparse")
        offsets = pa.array(_offsets([len(p[0]) for p in pairs]))
        indices = np.concatenate([p[0] for p in pairs]) if n else np.zeros(0)
        values = np.concatenate([p[1] for p in pairs]) if n else np.zeros(0)
        cols["sparse_indices"] = pa.ListArray.from_arrays(
            offsets, pa.array(indices.astype(np.int32, copy=False)))
        cols["sparse_values"] = pa.ListArray.from_arrays(
            offsets, pa.array(quantize_sparse_values(values, output_dtype)))
    if "multivector" in output_types:
        mats = [r.multivector for r in results]
        if any(m is None for m in mats):
            _missing(results, "multivector")
        dim = dims["multivector"]
        if any(m.ndim != 2 or m.shape[1] != dim for m in mats):
            raise ValueError(f"multivector token vectors must all be {dim}-dimensional")
        flat = np.concatenate(mats) if n else np.zeros((0, dim), np.float32)
        kind = schema.field("multivector").type
        tokens = _fixed(quantize_rows(flat, output_dtype), kind.value_type)
        cols["multivector"] = pa.ListArray.from_arrays(
            pa.array(_offsets([len(m) for m in mats])), tokens, type=kind)
    return cols


def to_table(results: Sequence[ItemResult], output_types: Sequence[str],
             output_dtype: str = "float32", dims: Mapping[str, int] | None = None) -> pa.Table:
    """`to_columns` as a table with `schema_for`'s schema."""
    dims = {**_infer_dims(results, output_types), **(dims or {})}
    return pa.table(to_columns(results, output_types, output_dtype, dims),
                    schema=schema_for(output_types, output_dtype, dims))


def _flat(array: pa.Array) -> np.ndarray:
    """Values of a (chunked) list or fixed-size-list array, without copies where possible."""
    return array.flatten().to_numpy(zero_copy_only=False)


def _bounds(array: pa.ListArray) -> np.ndarray:
    """Row bounds into `array.flatten()` (a sliced array's offsets do not start at 0)."""
    offsets = array.offsets.to_numpy()
    return offsets - offsets[0]


def from_columns(columns: pa.Table | Mapping[str, pa.Array | pa.ChunkedArray]) -> list[ItemResult]:
    """The inverse of `to_columns`: ItemResults holding the stored (quantized) arrays."""
    def col(name: str) -> pa.Array:
        c = columns[name] if isinstance(columns, Mapping) else columns.column(name)
        return c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c

    names = columns.keys() if isinstance(columns, Mapping) else columns.column_names
    token_count = col("token_count").to_numpy(zero_copy_only=False)
    truncated = col("truncated").to_numpy(zero_copy_only=False)
    results = [ItemResult(int(t), bool(c)) for t, c in zip(token_count, truncated)]
    if "dense" in names:
        dense = col("dense")
        values = _flat(dense).reshape(len(dense), dense.type.list_size)
        for r, v in zip(results, values):
            r.dense = v
    if "sparse_indices" in names:
        indices, values = col("sparse_indices"), col("sparse_values")
        bounds = _bounds(indices)
        flat_i, flat_v = _flat(indices), _flat(values)
        for r, a, b in zip(results, bounds[:-1], bounds[1:]):
            r.sparse = (flat_i[a:b], flat_v[a:b])
    if "multivector" in names:
        mv = col("multivector")
        width = mv.type.value_type.list_size
        bounds = _bounds(mv)
        tokens = _flat(mv.flatten()).reshape(-1, width)
        for r, a, b in zip(results, bounds[:-1], bounds[1:]):
            r.multivector = tokens[a:b]
    return results
