"""`sie-server encode`: a row's `id` field is the id by default, chosen input fields are kept
as output columns, and the resume rules cover both (the real command, in this process, on
all-MiniLM-L6-v2's real weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_corpus import write
from texts import TEXTS

from sie_server import cli
from sie_server.corpus import cli as corpus_cli
from sie_server.corpus.readers import InputError, default_id_field, read_rows
from sie_server.corpus.writer import read_output


def rows(n: int = 12) -> list[dict]:
    out = []
    for i in range(n):
        row = {"id": f"doc-{i}", "text": TEXTS[i], "url": f"https://example.org/{i}",
               "meta": {"lang": "en", "rank": i}, "year": 2000 + i}
        if i != 3:
            row["title"] = f"Title {i}"  # row 3 has none: a null
        out.append(row)
    return out


@pytest.mark.parametrize("fmt,name", [("jsonl", "d.jsonl"), ("csv", "d.csv"), ("tsv", "d.tsv"),
                                      ("parquet", "d.parquet"), ("jsonl", "d.jsonl.gz")])
def test_default_id_field_is_id_when_the_rows_have_one(tmp_path: Path, fmt: str, name: str) -> None:
    with_id = write(tmp_path / name, fmt, [{"id": "a", "text": "x"}])
    without = write(tmp_path / f"no-{name}", fmt, [{"key": "a", "text": "x"}])
    assert default_id_field([with_id]) == "id"
    assert default_id_field([without]) is None
    assert default_id_field([without, with_id]) is None  # the first input decides
    text = tmp_path / "t.txt"
    text.write_text("id\n")
    assert default_id_field([text]) is None


def test_reader_keeps_fields_as_strings(tmp_path: Path) -> None:
    src = write(tmp_path / "d.jsonl", "jsonl", rows(4))
    got = list(read_rows([src], id_field="id", keep=["title", "meta", "year"]))
    assert got[0].kept == ("Title 0", '{"lang": "en", "rank": 0}', "2000")
    assert got[3].kept == (None, '{"lang": "en", "rank": 3}', "2003")
    csv_src = write(tmp_path / "d.csv", "csv", [{"id": "a", "text": "x"}])
    with pytest.raises(InputError, match="no column 'title'"):
        list(read_rows([csv_src], keep=["title"]))
    text = tmp_path / "t.txt"
    text.write_text("a line\n")
    with pytest.raises(InputError, match="no fields to keep"):
        list(read_rows([text], keep=["title"]))


def encode(minilm_dir: Path, src: Path, out: Path, *flags: str) -> int:
    args = cli.parser().parse_args(
        ["encode", str(src), "--model", f"mini={minilm_dir}", "--output", str(out),
         "--device", "cpu", "--dtype", "float32", "--shard-rows", "5", "--batch-size", "3",
         "--log-every", "0", *flags])
    return corpus_cli.main(args)


def test_ids_by_default_kept_fields_and_resume(minilm_dir: Path, tmp_path: Path, capsys) -> None:
    data = rows()
    out = tmp_path / "out"
    for fmt, name in (("jsonl", "d.jsonl"), ("parquet", "d.parquet")):
        src = write(tmp_path / name, fmt, data if fmt == "jsonl" else
                    [{**r, "meta": json.dumps(r["meta"]), "title": r.get("title")} for r in data])
        target = out / fmt
        assert encode(minilm_dir, src, target, "--keep-fields", "title,url,meta,year") == 0
        table = read_output(target)
        assert table.column_names[:5] == ["id", "title", "url", "meta", "year"]
        assert table.schema.field("title").type == pa.string()
        assert table["id"].to_pylist() == [r["id"] for r in data]  # not row positions
        assert table["url"].to_pylist() == [r["url"] for r in data]
        assert table["title"].to_pylist() == [r.get("title") for r in data]
        assert table["year"].to_pylist() == [str(r["year"]) for r in data]
        assert [json.loads(m) for m in table["meta"].to_pylist()] == [r["meta"] for r in data]
        manifest = json.loads((target / "manifest.json").read_text())
        assert manifest["config"]["id_field"] == "id"
        assert manifest["config"]["keep_fields"] == ["title", "url", "meta", "year"]
        assert "rows have one, so it is the default" in manifest["ids"]
        assert "ids: the 'id' field" in capsys.readouterr().err

    src, target = tmp_path / "d.jsonl", out / "jsonl"
    keep = ("--keep-fields", "title,url,meta,year")
    # a lost shard is encoded again, with its kept fields
    first = read_output(target)
    (target / "part-00001.parquet").unlink()
    assert encode(minilm_dir, src, target, *keep) == 0
    again = read_output(target)
    fields = ["id", "title", "url", "meta", "year", "token_count"]
    assert again.select(fields).equals(first.select(fields))
    # the engine may batch the shard's texts with others: fp32 sums in another order
    np.testing.assert_allclose(np.stack(again["dense"].to_numpy(zero_copy_only=False)),
                               np.stack(first["dense"].to_numpy(zero_copy_only=False)), atol=1e-5)
    # the same run, the id field named or not: nothing to do
    assert encode(minilm_dir, src, target, *keep) == 0
    assert encode(minilm_dir, src, target, *keep, "--id-field", "id") == 0
    assert "already complete" in capsys.readouterr().err
    # other kept fields, or positions as ids: refused, naming the setting
    assert encode(minilm_dir, src, target, "--keep-fields", "title") == 1
    assert "keep_fields: ['title', 'url', 'meta', 'year'] then, ['title'] now" in capsys.readouterr().err
    assert encode(minilm_dir, src, target, *keep, "--id-field", "") == 1
    assert "id_field: 'id' then, None now" in capsys.readouterr().err

    # --id-field '' gives positions; a kept field named like an output column is refused
    positions = out / "positions"
    assert encode(minilm_dir, src, positions, "--id-field", "") == 0
    assert read_output(positions)["id"].to_pylist() == [str(i) for i in range(len(data))]
    assert "row positions" in json.loads((positions / "manifest.json").read_text())["ids"]
    assert "keep_fields" not in json.loads((positions / "manifest.json").read_text())["config"]
    assert encode(minilm_dir, src, out / "clash", "--keep-fields", "title,dense") == 1
    assert "'dense' is also an output column" in capsys.readouterr().err


def test_help_says_where_ids_come_from(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["encode", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: 'id' when the first input's rows have an 'id' field" in text
    assert "--keep-fields FIELDS" in text
