"""`sie-server encode` on the in-process backend: every input format and compression, id rules,
bad-row policies, manifest checks; output read back with pyarrow equals Engine.encode on the
same texts (float32 bit-equal; quantized dtypes equal quantize.py on those arrays).

Bit-equality needs each item's numbers not to depend on which other items share its batch
(a float32 matmul's rounding varies with the batch's shape): the `engine` fixture computes
one item per batch. `test_default_batching_within_tolerance` runs the default batching."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from sie_server.columns import from_columns
from sie_server.config import Settings
from sie_server.corpus.backends import InProcessBackend
from sie_server.corpus.readers import InputError, expand
from sie_server.corpus.run import BadRowError, Job, run
from sie_server.corpus.writer import ManifestMismatch, read_output
from sie_server.engine import Engine
from sie_server.quantize import quantize_rows
from texts import SHORT_TEXTS

ROOT = Path(__file__).resolve().parent.parent
M3, MINILM = "BAAI/bge-m3", "sentence-transformers/all-MiniLM-L6-v2"
ALL = ["dense", "sparse", "multivector"]
# one line each (plain text cannot hold a newline)
TEXTS = [t for t in SHORT_TEXTS if "\n" not in t and "\r" not in t and t.strip()][:40]


@pytest.fixture(scope="module")
def engine(bge_m3_dir: Path, minilm_dir: Path):
    eng = Engine(Settings(dtype="float32", models={M3: str(bge_m3_dir), MINILM: str(minilm_dir)},
                          default_models=[], device="cpu", max_batch_items=1))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def expected(engine) -> dict[str, list]:
    return {M3: engine.encode(M3, TEXTS, ALL), MINILM: engine.encode(MINILM, TEXTS, ["dense"])}


def encode(engine, files, out: Path, model: str = MINILM, types=("dense",), **kw) -> dict:
    options = kw.pop("options", {})
    backend = InProcessBackend(engine, model, list(types), options)
    job = Job(files=expand([str(f) for f in files]), output=out, output_types=list(types),
              options=options,
              **{"shard_rows": 16, "batch_size": 5, "concurrency": 4, **kw})
    return run(job, backend)


def write(path: Path, fmt: str, rows: list[dict]) -> Path:
    """`rows` in `fmt`, compressed by the suffix of `path` (.gz, .zst)."""
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
        return path
    if fmt == "text":
        data = "".join(r["text"] + "\n" for r in rows)
    elif fmt == "jsonl":
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
        w.writeheader()
        w.writerows(rows)
        data = buf.getvalue()
    raw = data.encode()
    if path.suffix == ".gz":
        raw = gzip.compress(raw)
    elif path.suffix == ".zst":
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


def docs(n: int = len(TEXTS), offset: int = 0) -> list[dict]:
    return [{"id": f"doc-{offset + i}", "text": TEXTS[i % len(TEXTS)]} for i in range(n)]


def assert_equals_engine(table: pa.Table, expected: list, types=("dense",)) -> None:
    got = from_columns(table)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.token_count == e.token_count and g.truncated == e.truncated, i
        if "dense" in types:
            assert g.dense.dtype == np.float32 and np.array_equal(g.dense, e.dense), i
        if "sparse" in types:
            assert np.array_equal(g.sparse[0], e.sparse[0]), i
            assert np.array_equal(g.sparse[1], e.sparse[1]), i
        if "multivector" in types:
            assert np.array_equal(g.multivector, e.multivector), i


@pytest.mark.parametrize("name,fmt", [
    ("d.jsonl", "jsonl"), ("d.jsonl.gz", "jsonl"), ("d.ndjson.zst", "jsonl"), ("d.csv", "csv"),
    ("d.csv.gz", "csv"), ("d.tsv", "tsv"), ("d.tsv.zst", "tsv"), ("d.parquet", "parquet"),
    ("d.txt", "text"), ("d.txt.gz", "text"), ("d.txt.zst", "text")])
def test_formats_and_compression(engine, expected, tmp_path: Path, name: str, fmt: str) -> None:
    src = write(tmp_path / name, fmt, docs())
    id_field = None if fmt == "text" else "id"
    summary = encode(engine, [src], tmp_path / "out", id_field=id_field)
    table = read_output(tmp_path / "out")
    want_ids = [f"doc-{i}" for i in range(len(TEXTS))] if id_field else \
        [str(i) for i in range(len(TEXTS))]
    assert table.column("id").to_pylist() == want_ids
    assert_equals_engine(table, expected[MINILM])
    assert summary["rows"] == len(TEXTS) and summary["skipped"] == 0
    assert summary["shards"] == -(-len(TEXTS) // 16)


def test_bge_m3_all_outputs_bit_equal(engine, expected, tmp_path: Path) -> None:
    src = write(tmp_path / "d.jsonl", "jsonl", docs())
    encode(engine, [src], tmp_path / "out", model=M3, types=ALL)
    table = read_output(tmp_path / "out")
    assert table.schema.field("multivector").type == pa.list_(
        pa.list_(pa.float32(), expected[M3][0].multivector.shape[1]))
    assert_equals_engine(table, expected[M3], ALL)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == len(TEXTS)
    assert manifest["tokens"] == sum(r.token_count for r in expected[M3])
    assert manifest["config"]["output_types"] == ALL
    assert len(manifest["config"]["model"]["weights_sha256"]) == 64
    assert [s["file"] for s in manifest["shards"]] == sorted(
        p.name for p in (tmp_path / "out").glob("part-*.parquet"))


def test_default_batching_within_tolerance(bge_m3_dir: Path, tmp_path: Path) -> None:
    """Default batching, many requests in flight: each item equals a one-call Engine.encode
    of all texts within 1e-5 (float32 rounding of differently shaped batches)."""
    eng = Engine(Settings(dtype="float32", models={M3: str(bge_m3_dir)}, default_models=[], device="cpu"))
    try:
        want = eng.encode(M3, TEXTS, ALL)
        src = write(tmp_path / "d.jsonl", "jsonl", docs())
        encode(eng, [src], tmp_path / "out", model=M3, types=ALL, batch_size=3, concurrency=8)
    finally:
        eng.close()
    got = from_columns(read_output(tmp_path / "out"))
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g.dense, e.dense, atol=1e-5)
        np.testing.assert_allclose(g.multivector, e.multivector, atol=1e-5)
        assert np.array_equal(g.sparse[0], e.sparse[0])
        np.testing.assert_allclose(g.sparse[1], e.sparse[1], atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "int8", "binary"])
def test_output_dtype(engine, expected, tmp_path: Path, dtype: str) -> None:
    src = write(tmp_path / "d.jsonl", "jsonl", docs())
    encode(engine, [src], tmp_path / "out", model=M3, types=ALL, output_dtype=dtype)
    got = from_columns(read_output(tmp_path / "out"))
    for g, e in zip(got, expected[M3]):
        assert np.array_equal(g.dense, quantize_rows(e.dense, dtype))
        assert np.array_equal(g.multivector, quantize_rows(e.multivector, dtype))


def test_query_options_reach_the_engine(engine, tmp_path: Path) -> None:
    src = write(tmp_path / "d.txt", "text", docs(8))
    encode(engine, [src], tmp_path / "out", options={"is_query": True, "instruction": "find"})
    want = engine.encode(MINILM, TEXTS[:8], ["dense"], {"is_query": True, "instruction": "find"})
    assert_equals_engine(read_output(tmp_path / "out"), want)


def test_ids_are_positions_across_files_and_folders(engine, expected, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    rows = [{"text": d["text"]} for d in docs()]
    write(folder / "a.jsonl", "jsonl", rows[:10])
    write(folder / "sub" / "b.csv", "csv", rows[10:25])
    write(folder / "c.txt.gz", "text", rows[25:])
    (folder / "notes.md").write_text("not an input")
    files = expand([str(folder)])
    assert [p.name for p in files] == ["a.jsonl", "c.txt.gz", "b.csv"]  # sorted paths
    encode(engine, [folder], tmp_path / "out")
    table = read_output(tmp_path / "out")
    order = rows[:10] + rows[25:] + rows[10:25]
    assert table.column("id").to_pylist() == [str(i) for i in range(len(rows))]
    want = engine.encode(MINILM, [r["text"] for r in order], ["dense"])
    assert_equals_engine(table, want)
    # a glob names the same files in the same order
    assert expand([str(folder / "**" / "*.*")]) == sorted(
        [*files, (folder / "notes.md").resolve()])


def test_integer_ids_become_strings(engine, tmp_path: Path) -> None:
    src = write(tmp_path / "d.parquet", "parquet",
                [{"pk": 1000 + i, "body": t} for i, t in enumerate(TEXTS[:6])])
    encode(engine, [src], tmp_path / "out", text_field="body", id_field="pk")
    assert read_output(tmp_path / "out").column("id").to_pylist() == [str(1000 + i) for i in range(6)]


BAD = ['{"id": "a", "text": "fine"}', '{"id": "b"}', '{"id": "c", "text": 7}',
       '{"id": "d", "text": null}', 'not json', '{"text": "no id"}', '[1, 2]',
       '{"id": "e", "text": "also fine"}']


def test_bad_rows_skipped_and_reported(engine, tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(BAD) + "\n")
    summary = encode(engine, [src], tmp_path / "out", id_field="id", on_bad_row="skip",
                     shard_rows=3)
    table = read_output(tmp_path / "out")
    assert table.column("id").to_pylist() == ["a", "e"]
    assert_equals_engine(table, engine.encode(MINILM, ["fine", "also fine"], ["dense"]))
    assert summary["skipped"] == 6
    assert summary["skipped_first_ids"] == ["b", "c", "d", "4", "5", "6"]  # positions w/o ids
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == 6 and manifest["skipped_first_ids"] == summary["skipped_first_ids"]


def test_bad_row_fails_the_run_then_resumes_with_skip(engine, tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    good = [json.dumps({"id": f"g{i}", "text": t}) for i, t in enumerate(TEXTS[:6])]
    src.write_text("\n".join(good + ['{"id": "x", "text": ["a list"]}'] + good[:2]) + "\n")
    with pytest.raises(BadRowError, match=r"row 6 \(id x\): 'text' is list"):
        encode(engine, [src], tmp_path / "out", id_field="id", shard_rows=3)
    # the shards before the bad row are kept; rerunning with skip resumes after them
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == [
        "part-00000.parquet", "part-00001.parquet"]
    summary = encode(engine, [src], tmp_path / "out", id_field="id", shard_rows=3,
                     on_bad_row="skip")
    assert summary["rows_this_run"] == 2 and summary["skipped"] == 1
    assert read_output(tmp_path / "out").column("id").to_pylist() == [
        *(f"g{i}" for i in range(6)), "g0", "g1"]


def test_a_text_the_model_refuses_is_a_bad_row(engine, tmp_path: Path) -> None:
    """XLM-R's "z" * k is refused (a 413: one word of more than 262,144 characters whose first
    tokens depend on how it ends). Its batch is split in halves, sent again, down to the
    refused text, which names its row; --on-bad-row decides, as for a row without text. The
    other rows, a long text among them, equal the engine's vectors."""
    prose = " ".join(TEXTS) * 40
    rows = [("g0", TEXTS[0]), ("long", prose), ("g1", TEXTS[1]), ("huge", "z" * 300_000),
            ("g2", TEXTS[2])]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
    with pytest.raises(BadRowError, match=r"^row 3 \(id huge\): one word of more than "
                                          r"262,144 characters.*--on-bad-row skip"):
        encode(engine, [src], tmp_path / "fail", model=M3, id_field="id", batch_size=5)
    summary = encode(engine, [src], tmp_path / "out", model=M3, types=ALL, id_field="id",
                     batch_size=5, on_bad_row="skip")
    assert summary["skipped"] == 1 and summary["skipped_first_ids"] == ["huge"]
    table = read_output(tmp_path / "out")
    kept = [r for r in rows if r[0] != "huge"]
    assert table.column("id").to_pylist() == [i for i, _ in kept]
    assert_equals_engine(table, engine.encode(M3, [t for _, t in kept], ALL), ALL)


def test_a_batch_over_the_queue_limit_is_sent_in_parts(minilm_dir: Path, tmp_path: Path) -> None:
    """A batch of more tokens than the model queues (a 413; 256 texts of 8,192 tokens are
    over the default 2,000,000) is never refused: the in-process backend sends at most
    limit / max_tokens texts per engine request (here 200 // 256: one), and a refused batch
    would be split until each part is taken. Every row is encoded."""
    eng = Engine(Settings(dtype="float32", models={MINILM: str(minilm_dir)}, default_models=[],
                          device="cpu", max_batch_items=1, max_queued_tokens=200))
    try:
        texts = [f"{t} {t}" for t in TEXTS[:12]]
        want = [eng.encode(MINILM, [t], ["dense"])[0] for t in texts]
        tokens = [r.token_count for r in want]
        assert sum(tokens) > 2 * 200 and max(tokens) <= 200, tokens  # split twice at least
        src = write(tmp_path / "d.jsonl", "jsonl", [{"text": t} for t in texts])
        summary = encode(eng, [src], tmp_path / "out", batch_size=12)
        assert summary["rows"] == 12 and summary["skipped"] == 0
        assert_equals_engine(read_output(tmp_path / "out"), want)
        backend = InProcessBackend(eng, MINILM, ["dense"], {})
        assert backend.per_request == 1
        backend.per_request = 12  # the split alone
        job = Job(files=[src], output=tmp_path / "split", output_types=["dense"], batch_size=12)
        assert run(job, backend)["rows"] == 12
        assert_equals_engine(read_output(tmp_path / "split"), want)
    finally:
        eng.close()


def test_unreadable_inputs_fail_clearly(engine, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        expand([str(tmp_path / "missing.jsonl")])
    with pytest.raises(InputError, match="no file matches"):
        expand([str(tmp_path / "*.csv")])
    src = write(tmp_path / "d.csv", "csv", [{"id": "1", "body": "x"}])
    with pytest.raises(InputError, match="no column 'text' in the header"):
        encode(engine, [src], tmp_path / "out")
    src = write(tmp_path / "d.parquet", "parquet", [{"body": "x"}])
    with pytest.raises(InputError, match="no column 'text'"):
        encode(engine, [src], tmp_path / "out2")
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(InputError, match="unknown format"):
        encode(engine, [tmp_path / "d.xml"], tmp_path / "out3")


def test_finished_run_rerun_does_nothing(engine, tmp_path: Path) -> None:
    src = write(tmp_path / "d.jsonl", "jsonl", docs())
    encode(engine, [src], tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    summary = encode(engine, [src], tmp_path / "out")
    assert summary["already_complete"] and summary["rows_this_run"] == 0
    assert summary["rows"] == len(TEXTS)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before
    # a shard deleted from a finished folder is encoded again, the others are kept
    (tmp_path / "out" / "part-00001.parquet").unlink()
    summary = encode(engine, [src], tmp_path / "out")
    assert not summary["already_complete"] and summary["rows_this_run"] == 16
    assert read_output(tmp_path / "out").column("id").to_pylist() == [
        str(i) for i in range(len(TEXTS))]


def test_changed_settings_refuse_with_reason(engine, tmp_path: Path) -> None:
    src = write(tmp_path / "d.jsonl", "jsonl", docs(10))
    encode(engine, [src], tmp_path / "out")
    with pytest.raises(ManifestMismatch, match=r"output_types: \['dense'\] then"):
        encode(engine, [src], tmp_path / "out", model=M3, types=["dense", "sparse"])
    with pytest.raises(ManifestMismatch, match="model.name: "):
        encode(engine, [src], tmp_path / "out", model=M3)
    with pytest.raises(ManifestMismatch, match="options: "):
        encode(engine, [src], tmp_path / "out", options={"is_query": True})
    write(src, "jsonl", docs(11))
    with pytest.raises(ManifestMismatch, match="inputs: "):
        encode(engine, [src], tmp_path / "out")
    # batch size and concurrency do not change the output: a rerun may change them
    write(src, "jsonl", docs(10))
    assert encode(engine, [src], tmp_path / "out", batch_size=2, concurrency=1)["already_complete"]


def test_empty_input(engine, tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("")
    summary = encode(engine, [tmp_path / "e.jsonl"], tmp_path / "out")
    assert summary["rows"] == 0 and summary["shards"] == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "complete"


def test_cli_plain_progress_and_summary(minilm_dir: Path, tmp_path: Path) -> None:
    """The real command in a subprocess (not a terminal): progress lines, a summary, the
    JSON summary on stdout, exit 0; a changed option exits 1 with the reason."""
    src = write(tmp_path / "d.jsonl", "jsonl", docs())
    cmd = [sys.executable, "-m", "sie_server.cli", "encode", str(src), "--model",
           f"mini={minilm_dir}", "--output", str(tmp_path / "out"), "--device", "cpu",
           "--dtype", "float32", "--id-field", "id", "--shard-rows", "10", "--batch-size", "4",
           "--log-every", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "encode: " in done.stderr and "tokens/s" in done.stderr
    assert f"{len(TEXTS)} rows" in done.stderr.splitlines()[-1]
    summary = json.loads(done.stdout)
    assert summary["rows"] == len(TEXTS) and summary["shards"] == 4
    again = subprocess.run(cmd + ["--output-types", "dense", "--is-query"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "options: {} then, {'is_query': True} now" in again.stderr


@pytest.mark.parametrize("name,fmt", [("r.jsonl", "jsonl"), ("r.jsonl.gz", "jsonl"),
                                      ("r.csv", "csv"), ("r.tsv.zst", "tsv"),
                                      ("r.parquet", "parquet"), ("r.txt", "text")])
def test_reader_resume_start_and_count(tmp_path: Path, name: str, fmt: str) -> None:
    """read_rows(start=k) gives exactly the rows from position k of a full read (Parquet
    row groups skipped by their metadata); count_rows counts every row (a CSV cell may hold
    newlines)."""
    from sie_server.corpus.readers import count_rows, read_rows

    rows = [{"id": f"r{i}", "text": f"line {i}" + ("\nsecond line" if fmt in ("csv", "tsv")
                                                   and i % 3 == 0 else "")} for i in range(23)]
    src = write(tmp_path / name, fmt, rows)
    id_field = None if fmt == "text" else "id"
    full = list(read_rows([src, src], id_field=id_field))
    assert len(full) == 46 == count_rows([src, src])
    assert [r.position for r in full] == list(range(46))
    if fmt in ("csv", "tsv"):
        assert full[3].text == "line 3\nsecond line"
    for start in (0, 5, 7, 22, 23, 30, 46):
        assert list(read_rows([src, src], id_field=id_field, start=start)) == full[start:]


def test_plain_text_blank_line_is_a_bad_row(tmp_path: Path) -> None:
    from sie_server.corpus.readers import BadRow, read_rows

    (tmp_path / "t.txt").write_text("one\n\n  \nfour\n")
    rows = list(read_rows([tmp_path / "t.txt"]))
    assert [type(r).__name__ for r in rows] == ["Row", "BadRow", "BadRow", "Row"]
    assert rows[3].id == "3" and rows[3].text == "four"
    assert isinstance(rows[1], BadRow) and rows[1].reason == "empty line"


def test_progress_lines_and_bar() -> None:
    import io

    from sie_server.corpus.progress import Progress

    plain = io.StringIO()
    p = Progress(initial=10, stream=plain, interval_s=0, tty=False)
    p.set_total(40)
    p.update(10, 500)
    line = plain.getvalue().strip()
    assert line.startswith("encode: 20/40 rows (50.0%), ETA ") and "tokens/s" in line
    bar = io.StringIO()
    p = Progress(initial=0, stream=bar, tty=True)
    p.set_total(8)
    p.update(8, 100)
    p.close()
    assert "8/8" in bar.getvalue() and "tok/s" in bar.getvalue()


def test_lora_option(bge_m3_dir: Path, legal_lora, tmp_path: Path) -> None:
    """--lora-id reaches the engine: the output equals Engine.encode with the adapter and
    differs from the base model's."""
    from conftest import LEGAL_LORA

    eng = Engine(Settings(dtype="float32", models={M3: str(bge_m3_dir)}, default_models=[], device="cpu",
                          adapter_roots=[legal_lora["root"]], max_batch_items=1))
    try:
        src = write(tmp_path / "d.jsonl", "jsonl", docs(6))
        encode(eng, [src], tmp_path / "out", model=M3, options={"lora_id": LEGAL_LORA})
        want = eng.encode(M3, TEXTS[:6], ["dense"], {"lora_id": LEGAL_LORA})
        base = eng.encode(M3, TEXTS[:6], ["dense"])
    finally:
        eng.close()
    assert_equals_engine(read_output(tmp_path / "out"), want)
    assert not np.array_equal(want[0].dense, base[0].dense)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["options"] == {"lora_id": LEGAL_LORA}
