"""Parquet shards and the manifest of an output folder; every write is atomic.

Shard k holds the good rows of input positions [k * shard_rows, (k + 1) * shard_rows). It is
written as `part-0000k.parquet.tmp`, flushed to disk, then renamed: a `part-*.parquet` file
is complete by construction, so a killed run resumes by redoing the shards that have no file.
Each shard carries its own statistics in its Parquet key-value metadata (`sie.shard`), so the
manifest can always be rebuilt from the shards.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "sie-corpus/1"
FIRST_BAD = 10  # bad-row ids kept per shard and in the manifest
VECTOR_COLUMNS = ("dense", "multivector")


class ManifestMismatch(RuntimeError):
    """The output folder holds a run with other settings; mixing would corrupt it."""


@dataclass
class ShardStats:
    index: int
    file: str
    first_position: int
    rows: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped: int = 0
    skipped_ids: list[str] = field(default_factory=list)

    def skip(self, row_id: str) -> None:
        """Count a skipped row, keeping the first ids for the report."""
        self.skipped += 1
        if len(self.skipped_ids) < FIRST_BAD:
            self.skipped_ids.append(row_id)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """One shard being written: row groups of about `row_group_bytes` (in memory, before
    compression), then `commit()` renames the finished file into place."""

    def __init__(self, folder: Path, stats: ShardStats, schema: pa.Schema,
                 row_group_bytes: int) -> None:
        self.path = folder / stats.file
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.stats = stats
        self.schema = schema
        self.row_group_bytes = row_group_bytes
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        # vectors barely compress (float32: ~7%) and dictionary encoding never pays on them:
        # both off for the vector columns keeps the writer ahead of a GPU
        self._writer = pq.ParquetWriter(
            self.tmp, schema, use_dictionary=False,
            compression={f.name: "none" if f.name in VECTOR_COLUMNS else "zstd" for f in schema})

    def append(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_bytes += table.nbytes
        if self._pending_bytes >= self.row_group_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            table = pa.concat_tables(self._pending)
            self._writer.write_table(table, row_group_size=table.num_rows)
        self._pending, self._pending_bytes = [], 0

    def commit(self) -> ShardStats:
        self._flush()
        self._writer.add_key_value_metadata({"sie.shard": json.dumps(asdict(self.stats))})
        self._writer.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        return self.stats

    def abort(self) -> None:
        self._writer.close()
        self.tmp.unlink(missing_ok=True)


def read_shard_stats(path: Path) -> ShardStats:
    meta = pq.ParquetFile(path).metadata.metadata or {}
    return ShardStats(**json.loads(meta[b"sie.shard"]))


class OutputFolder:
    """The output folder of one run: its manifest, its finished shards, new shard writers."""

    def __init__(self, folder: Path, config: dict[str, Any], info: dict[str, Any]) -> None:
        """`config` must equal a previous run's to resume it; `info` is recorded, not checked."""
        self.folder = folder
        self.config = config
        self.info = info
        folder.mkdir(parents=True, exist_ok=True)
        previous = self._read_manifest()
        if previous is not None:
            check_config(previous.get("config", {}), config)
        # complete, and no listed shard deleted since (a deleted shard is encoded again)
        self.complete = previous is not None and previous.get("status") == "complete" and all(
            (folder / s["file"]).exists() for s in previous.get("shards", []))
        for tmp in folder.glob("*.tmp"):  # a killed run's unfinished writes
            tmp.unlink()
        self.done: dict[int, ShardStats] = {}
        for path in sorted(folder.glob("part-*.parquet")):
            stats = read_shard_stats(path)
            self.done[stats.index] = stats
        self.started_at = (previous or {}).get("started_at") or time.time()
        if not self.complete:
            self.write_manifest("running")

    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.folder / MANIFEST
        if not path.exists():
            if any(self.folder.glob("part-*.parquet")):
                raise ManifestMismatch(f"{self.folder} holds shards but no {MANIFEST}; "
                                       "use an empty folder")
            return None
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ManifestMismatch(f"{path} is not a {MANIFEST_FORMAT} manifest")
        return manifest

    def writer(self, stats: ShardStats, schema: pa.Schema, row_group_bytes: int) -> ShardWriter:
        return ShardWriter(self.folder, stats, schema, row_group_bytes)

    def finished(self, stats: ShardStats) -> None:
        self.done[stats.index] = stats
        self.write_manifest("running")

    def write_manifest(self, status: str) -> dict[str, Any]:
        shards = [self.done[k] for k in sorted(self.done)]
        skipped_ids = [i for s in shards for i in s.skipped_ids][:FIRST_BAD]
        manifest = {
            "format": MANIFEST_FORMAT, "status": status, "config": self.config, **self.info,
            "rows": sum(s.rows for s in shards), "tokens": sum(s.tokens for s in shards),
            "truncated": sum(s.truncated for s in shards),
            "skipped": sum(s.skipped for s in shards), "skipped_first_ids": skipped_ids,
            "shards": [{"file": s.file, "first_position": s.first_position, "rows": s.rows,
                        "tokens": s.tokens, "skipped": s.skipped} for s in shards],
            "started_at": self.started_at,
            "finished_at": time.time() if status == "complete" else None,
        }
        _write_atomic(self.folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        return manifest


def check_config(previous: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise ManifestMismatch naming every setting that differs (a `None` on either side of
    a `model` entry means "unknown" and is not compared)."""
    diffs = []
    for key in sorted(set(previous) | set(current)):
        old, new = previous.get(key), current.get(key)
        if key == "model" and isinstance(old, dict) and isinstance(new, dict):
            for k in sorted(set(old) | set(new)):
                if old.get(k) is not None and new.get(k) is not None and old[k] != new[k]:
                    diffs.append(f"model.{k}: {old[k]!r} then, {new[k]!r} now")
        elif old != new:
            diffs.append(f"{key}: {old!r} then, {new!r} now")
    if diffs:
        raise ManifestMismatch("the output folder holds a run with other settings; use another "
                               "--output or the same settings:\n  " + "\n  ".join(diffs))


def read_output(folder: Path) -> pa.Table:
    """Every shard of an output folder as one table, in input order."""
    paths = sorted(Path(folder).glob("part-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"{folder} holds no part-*.parquet shard")
    return pa.concat_tables(pq.read_table(p) for p in paths)
