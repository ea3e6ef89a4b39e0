"""Input files -> rows: JSONL, CSV/TSV, Parquet and plain text, gzip/zstd compressed or not.

Every row has a position: its index across all inputs in order (0-based, counting bad rows
too), stable as long as the inputs are. A row's id is its `id_field` value (as a string) or,
without an id field, its position (`default_id_field` picks `id` when the rows have one). A
row whose text is missing or not a string, or whose id is missing, is a `BadRow`: the caller
decides to skip it or fail. A row also carries the values of the `keep` fields, as strings
(other JSON values as their JSON text; missing or null: None).
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

FORMATS = ("jsonl", "csv", "tsv", "parquet", "text")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
               ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".txt": "text",
               ".text": "text"}
_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


class InputError(ValueError):
    """An input cannot be read at all (missing file, unknown format, missing column)."""


@dataclass(frozen=True)
class Row:
    position: int
    id: str
    text: str
    kept: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class BadRow:
    position: int
    id: str
    reason: str


def expand(inputs: Sequence[str]) -> list[Path]:
    """Files named by paths, globs and folders (folders: every known format inside,
    recursively), each group sorted, in the order given, duplicates dropped."""
    files: list[Path] = []
    for spec in inputs:
        if any(c in spec for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise InputError(f"{spec}: no file matches")
        elif Path(spec).is_dir():
            found = sorted(p for p in Path(spec).rglob("*") if p.is_file() and _known(p))
            if not found:
                raise InputError(f"{spec}: folder holds no {'/'.join(FORMATS)} file")
        elif Path(spec).is_file():
            found = [Path(spec)]
        else:
            raise InputError(f"{spec}: no such file or folder")
        files += found
    return list(dict.fromkeys(p.resolve() for p in files))


def _split(path: Path) -> tuple[str | None, str | None]:
    """(format, compression) from the file name, e.g. docs.jsonl.zst -> ("jsonl", "zstd")."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = _COMPRESSION.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    return (_EXTENSIONS.get(suffixes[-1]) if suffixes else None), compression


def _known(path: Path) -> bool:
    return _split(path)[0] is not None


def file_format(path: Path, override: str | None = None) -> str:
    fmt = override or _split(path)[0]
    if fmt is None:
        raise InputError(f"{path}: unknown format (name it .jsonl, .csv, .tsv, .parquet or .txt, "
                         f"optionally .gz/.zst, or pass --format)")
    return fmt


def open_text(path: Path) -> IO[str]:
    """The file as text (UTF-8), decompressed by its suffix (.gz, .zst)."""
    compression = _split(path)[1]
    if compression == "gzip":
        raw: IO[bytes] = gzip.open(path, "rb")
    elif compression == "zstd":
        import zstandard

        raw = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"),
                                                                           closefd=True))
    else:
        raw = open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _lines(f: IO[str]) -> Iterator[str]:
    """Lines without their ending; a final newline makes no extra row."""
    for line in f:
        yield line.rstrip("\r\n")


def _records(path: Path, fmt: str, fields: list[str], skip: int = 0) -> Iterator[Any]:
    """The file's rows: dicts (jsonl, csv, tsv, parquet), strings (text), or an Exception
    for a row that cannot be parsed; the first `skip` rows come as None, unparsed (a resume
    does not decode what it will not use)."""
    if fmt == "parquet":
        if _split(path)[1]:
            raise InputError(f"{path}: compress Parquet inside the file (its codecs), not around it")
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        missing = [f for f in fields if f not in pf.schema_arrow.names]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r} (columns: "
                             f"{', '.join(pf.schema_arrow.names)})")
        groups = []
        for g in range(pf.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            if skip >= rows:
                skip -= rows
                yield from itertools.repeat(None, rows)
            else:
                skip = 0  # row groups from here on are read
                groups.append(g)
        if groups:
            for batch in pf.iter_batches(batch_size=4096, columns=fields, row_groups=groups):
                yield from batch.to_pylist()
        return
    with open_text(path) as f:
        if fmt == "text":
            yield from _lines(f)
        elif fmt == "jsonl":
            for i, line in enumerate(_lines(f)):
                if i < skip:
                    yield None
                    continue
                try:
                    yield json.loads(line)
                except ValueError as e:
                    yield ValueError(f"invalid JSON ({e})")
        else:
            reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
            header = reader.fieldnames or []
            missing = [c for c in fields if c not in header]
            if missing:
                raise InputError(f"{path}: no column {missing[0]!r} in the header "
                                 f"({', '.join(header)})")
            yield from reader


def read_rows(files: Sequence[Path], text_field: str = "text", id_field: str | None = None,
              fmt: str | None = None, start: int = 0, keep: Sequence[str] = ()
              ) -> Iterator[Row | BadRow]:
    """Every row of `files` in order, as Row or BadRow; rows before position `start` are
    counted, not decoded."""
    position = 0
    for path in files:
        kind = file_format(path, fmt)
        if kind == "text" and keep:
            raise InputError(f"{path}: plain text rows have no fields to keep")
        fields = [] if kind == "text" else list(dict.fromkeys(
            [text_field, *([id_field] if id_field else []), *keep]))
        for record in _records(path, kind, fields, max(start - position, 0)):
            if position >= start:
                row = _row(position, record, text_field, id_field)
                if keep and isinstance(row, Row):
                    row = Row(row.position, row.id, row.text,
                              tuple(_kept(record.get(f)) for f in keep))
                yield row
            position += 1


def _kept(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def default_id_field(files: Sequence[Path], fmt: str | None = None) -> str | None:
    """`id` when the first input's rows have an `id` field (a CSV/TSV header or Parquet column
    named `id`, or an `id` key in the first JSONL row), else None (ids are row positions)."""
    if not files:
        return None
    path = files[0]
    kind = file_format(path, fmt)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return "id" if "id" in pq.ParquetFile(path).schema_arrow.names else None
    if kind == "text":
        return None
    with open_text(path) as f:
        if kind in ("csv", "tsv"):
            header = next(csv.reader(f, delimiter="\t" if kind == "tsv" else ","), [])
            return "id" if "id" in header else None
        for line in _lines(f):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    return None
                return "id" if isinstance(record, dict) and "id" in record else None
    return None


def _row(position: int, record: Any, text_field: str, id_field: str | None) -> Row | BadRow:
    if isinstance(record, Exception):
        return BadRow(position, str(position), str(record))
    if isinstance(record, str):  # plain text: the line is the text
        return Row(position, str(position), record) if record.strip() else \
            BadRow(position, str(position), "empty line")
    if not isinstance(record, dict):
        return BadRow(position, str(position), f"row is a JSON {type(record).__name__}, not an object")
    row_id = str(position)
    if id_field:
        value = record.get(id_field)
        if value is None or isinstance(value, (dict, list, bool)) or value == "":
            return BadRow(position, str(position), f"no usable {id_field!r} (got {value!r})")
        row_id = str(value)
    text = record.get(text_field)
    if text is None:
        return BadRow(position, row_id, f"no {text_field!r} field")
    if not isinstance(text, str):
        return BadRow(position, row_id, f"{text_field!r} is {type(text).__name__}, not a string")
    return Row(position, row_id, text)


def count_rows(files: Sequence[Path], fmt: str | None = None) -> int:
    """Rows in `files` (for progress): Parquet from its footer, CSV/TSV by parsing, others
    by counting lines."""
    total = 0
    for path in files:
        kind = file_format(path, fmt)
        if kind == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        elif kind in ("csv", "tsv"):
            with open_text(path) as f:
                total += sum(1 for _ in csv.reader(f, delimiter="\t" if kind == "tsv" else ",")) - 1
        else:
            with open_text(path) as f:
                total += sum(1 for _ in f)
    return max(total, 0)


def describe(files: Sequence[Path]) -> list[dict[str, Any]]:
    """Each input's path and size: what the manifest checks on resume."""
    return [{"path": str(p), "bytes": os.path.getsize(p)} for p in files]
