"""columns.py: Engine.encode results -> Arrow columns -> Parquet -> numpy, compared with the
engine's own arrays (float32 bit-equal; other dtypes equal to quantize.py on the same arrays)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sie_server.columns import from_columns, schema_for, to_columns, to_table
from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.engine.request import ItemResult
from sie_server.quantize import OUTPUT_DTYPES, quantize_rows, quantize_sparse_values
from texts import SHORT_TEXTS

ALL = ["dense", "sparse", "multivector"]
M3 = "BAAI/bge-m3"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def engine(bge_m3_dir: Path, minilm_dir: Path):
    eng = Engine(Settings(dtype="float32", models={M3: str(bge_m3_dir), MINILM: str(minilm_dir)},
                          default_models=[], device="cpu"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def m3_results(engine) -> list[ItemResult]:
    return engine.encode(M3, SHORT_TEXTS[:24], ALL)


def roundtrip(table: pa.Table, tmp_path: Path, row_group_size: int = 5) -> pa.Table:
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=row_group_size)
    return pq.read_table(path)


def test_float32_bit_equal_through_parquet(m3_results, tmp_path: Path) -> None:
    table = roundtrip(to_table(m3_results, ALL), tmp_path)
    dim = m3_results[0].dense.shape[0]
    assert table.schema.field("dense").type == pa.list_(pa.float32(), dim)
    assert table.schema.field("multivector").type == pa.list_(pa.list_(pa.float32(), dim))
    back = from_columns(table)
    assert len(back) == len(m3_results)
    for ours, got in zip(m3_results, back):
        assert got.token_count == ours.token_count and got.truncated == ours.truncated
        assert got.dense.dtype == np.float32 and np.array_equal(got.dense, ours.dense)
        assert np.array_equal(got.sparse[0], ours.sparse[0])
        assert got.sparse[0].dtype == np.int32
        assert np.array_equal(got.sparse[1], ours.sparse[1])
        assert got.multivector.shape == ours.multivector.shape
        assert np.array_equal(got.multivector, ours.multivector)


def test_read_back_with_plain_pyarrow(m3_results, tmp_path: Path) -> None:
    """A reader without our code: to_pylist / numpy on the Parquet file."""
    table = roundtrip(to_table(m3_results, ALL), tmp_path)
    rows = table.to_pylist()
    for ours, row in zip(m3_results, rows):
        assert np.array_equal(np.array(row["dense"], np.float32), ours.dense)
        assert row["sparse_indices"] == ours.sparse[0].tolist()
        assert np.array_equal(np.array(row["sparse_values"], np.float32), ours.sparse[1])
        assert np.array_equal(np.array(row["multivector"], np.float32), ours.multivector)
    flat = table.column("dense").combine_chunks().flatten().to_numpy()
    assert np.array_equal(flat.reshape(len(m3_results), -1), np.stack([r.dense for r in m3_results]))


@pytest.mark.parametrize("dtype", [d for d in OUTPUT_DTYPES if d != "float32"])
def test_quantized_dtypes(m3_results, dtype: str, tmp_path: Path) -> None:
    dim = m3_results[0].dense.shape[0]
    table = roundtrip(to_table(m3_results, ALL, dtype), tmp_path)
    width = math.ceil(dim / 8) if dtype in ("binary", "ubinary") else dim
    arrow = {"float16": pa.float16(), "int8": pa.int8()}.get(dtype, pa.uint8())
    assert table.schema.field("dense").type == pa.list_(arrow, width)
    assert table.schema.field("sparse_values").type == pa.list_(
        pa.float16() if dtype == "float16" else pa.float32())
    for ours, got in zip(m3_results, from_columns(table)):
        assert np.array_equal(got.dense, quantize_rows(ours.dense, dtype))
        assert got.dense.shape == (width,)
        assert np.array_equal(got.multivector, quantize_rows(ours.multivector, dtype))
        assert np.array_equal(got.sparse[1], quantize_sparse_values(ours.sparse[1], dtype))
        assert got.sparse[1].dtype == (np.float16 if dtype == "float16" else np.float32)


def test_binary_bits_are_signs(m3_results) -> None:
    """Independent of quantize.py: bit j of the packed row is dense[j] > 0 (MSB first)."""
    cols = to_columns(m3_results, ["dense"], "binary")
    packed = cols["dense"].flatten().to_numpy().reshape(len(m3_results), -1)
    for ours, row in zip(m3_results, packed):
        bits = [(row[j // 8] >> (7 - j % 8)) & 1 for j in range(ours.dense.shape[0])]
        assert bits == [int(x > 0) for x in ours.dense]


def test_minilm_dense_only(engine, tmp_path: Path) -> None:
    results = engine.encode(MINILM, SHORT_TEXTS[:10], ["dense"])
    table = roundtrip(to_table(results, ["dense"]), tmp_path)
    assert table.column_names == ["token_count", "truncated", "dense"]
    assert table.schema.field("dense").type == pa.list_(pa.float32(), 384)
    for ours, got in zip(results, from_columns(table)):
        assert np.array_equal(got.dense, ours.dense)


def test_truncated_and_token_count(engine) -> None:
    results = engine.encode(MINILM, ["word " * 600, "short"], ["dense"])
    cols = to_columns(results, ["dense"])
    assert cols["truncated"].to_pylist() == [r.truncated for r in results] == [True, False]
    assert cols["token_count"].to_pylist() == [r.token_count for r in results]
    assert cols["token_count"].type == pa.int32()


def test_empty_results_need_dims() -> None:
    cols = to_columns([], ALL, "float16", dims={"dense": 10, "multivector": 10})
    assert all(len(a) == 0 for a in cols.values())
    assert cols["dense"].type == pa.list_(pa.float16(), 10)
    with pytest.raises(ValueError, match="dims"):
        to_columns([], ["dense"])


def test_schema_matches_columns_and_order(m3_results) -> None:
    dims = {"dense": m3_results[0].dense.shape[0], "multivector": m3_results[0].multivector.shape[1]}
    cols = to_columns(m3_results, ["multivector", "dense", "sparse"], "int8")
    schema = schema_for(["multivector", "dense", "sparse"], "int8", dims)
    assert list(cols) == schema.names == [
        "token_count", "truncated", "dense", "sparse_indices", "sparse_values", "multivector"]
    for name in schema.names:
        assert cols[name].type == schema.field(name).type, name


def test_sliced_columns_read_back(m3_results) -> None:
    table = to_table(m3_results, ALL).slice(5, 7)
    for ours, got in zip(m3_results[5:12], from_columns(table)):
        assert np.array_equal(got.sparse[0], ours.sparse[0])
        assert np.array_equal(got.multivector, ours.multivector)
        assert np.array_equal(got.dense, ours.dense)


def test_errors_name_the_problem(m3_results) -> None:
    with pytest.raises(ValueError, match="unknown output type"):
        to_columns(m3_results, ["colbert"])
    with pytest.raises(ValueError, match="unknown output_dtype"):
        to_columns(m3_results, ["dense"], "int4")
    with pytest.raises(ValueError, match="result 1 has no sparse"):
        to_columns([m3_results[0], ItemResult(3, False, dense=m3_results[0].dense)], ["sparse"])
    with pytest.raises(ValueError, match="dense vectors"):
        to_columns(m3_results[:2], ["dense"], dims={"dense": 7})
