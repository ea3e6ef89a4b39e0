"""One encode run: read rows, keep requests in flight, write shards in order, resume.

The calling thread reads rows and submits batches (on the in-process backend, submitting
tokenizes); the backend encodes them; a writer thread turns finished batches into Arrow and
Parquet. A bounded queue between them keeps `concurrency` batches in flight.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from ..columns import schema_for, to_columns
from .progress import Progress
from .readers import BadRow, count_rows, describe, file_format, read_rows
from .writer import FIRST_BAD, OutputFolder, ShardStats, ShardWriter, shard_name

ROW_GROUP_BYTES = 64 << 20  # uncompressed bytes per Parquet row group
_ITEM = re.compile(r"^(413 \w+: )?items\[\d+\]\.text: ")
_RAY_HINT = ("; --ray encodes whole shards, so it cannot skip one text: remove the row, or "
             "encode in-process or with --server, where --on-bad-row skip skips it")


class BadRowError(ValueError):
    """A row without usable text or id, or one the model refuses, with --on-bad-row fail."""


def bad_row(position: int, row_id: str, reason: str) -> BadRowError:
    return BadRowError(f"row {position} (id {row_id}): {reason}; pass --on-bad-row skip "
                       "to skip such rows (they are reported)")


def _refusal(error: BaseException) -> str | None:
    """Why a request was refused for what it holds (a 413 from the engine, the SDK, or inside
    Ray's wrappers of either: too many tokens or bytes, or a text the model cannot take), or
    None for any other failure."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "status", None) == 413:
            return _ITEM.sub("", str(e))
        e = getattr(e, "cause", None) or e.__cause__
    return None


@dataclass(frozen=True)
class Refused:
    """A text the model refused (a 413 for it alone): a bad row."""

    reason: str


@dataclass
class _Batch:
    ids: list[str]
    positions: list[int]
    texts: list[str]
    kept: list[tuple[str | None, ...]]
    results: Future


def _submit(backend, texts: list[str]) -> Future:
    """`backend.submit`, with a refusal raised at once (the in-process engine refuses as it
    tokenizes) put in the Future."""
    try:
        return backend.submit(texts)
    except Exception as e:
        if _refusal(e) is None:
            raise
        future: Future = Future()
        future.set_exception(e)
        return future


def _results(backend, texts: list[str], future: Future, split: bool) -> list:
    """A batch's `ItemResult`s, or `Refused` for a text refused alone. With `split`, a refused
    batch of several texts is split in halves, each submitted again, down to the refused
    texts: a batch over a token or body limit is sent in parts, and a refused text names its
    row; without, its refusal is raised."""
    try:
        return future.result()
    except Exception as e:
        reason = _refusal(e)
        if reason is None:
            raise
        if len(texts) == 1:
            return [Refused(reason)]
        if not split:
            raise
        half = len(texts) // 2
        parts = [(t, _submit(backend, t)) for t in (texts[:half], texts[half:])]
        return [r for t, f in parts for r in _results(backend, t, f, split)]


@dataclass
class Job:
    files: list[Path]
    output: Path
    output_types: list[str]
    output_dtype: str = "float32"
    options: dict[str, Any] = field(default_factory=dict)  # is_query, instruction, lora_id
    text_field: str = "text"
    id_field: str | None = None  # None: ids are row positions
    id_field_default: bool = False  # id_field came from the rows (default_id_field), not a flag
    keep_fields: list[str] = field(default_factory=list)  # input fields kept as output columns
    format: str | None = None
    shard_rows: int = 100_000
    batch_size: int = 256
    concurrency: int = 8
    on_bad_row: str = "fail"  # or "skip"
    split_refused: bool = True  # False on Ray: a Dataset per part would load the model again
    row_group_bytes: int = ROW_GROUP_BYTES
    log_interval_s: float = 10.0

    def config(self, identity: dict[str, Any]) -> dict[str, Any]:
        """What must be equal for a rerun to resume into the same folder."""
        return {"model": identity, "output_types": self.output_types,
                "output_dtype": self.output_dtype, "options": self.options,
                "text_field": self.text_field, "id_field": self.id_field,
                # only when set: folders written before the flag existed still resume
                **({"keep_fields": self.keep_fields} if self.keep_fields else {}),
                "format": self.format, "shard_rows": self.shard_rows,
                "inputs": describe(self.files)}

    def ids(self) -> str:
        """Where the ids come from, in words (the manifest's `ids`)."""
        if self.id_field is None:
            return "row positions (the rows have no 'id' field, or --id-field '' was given)"
        if self.id_field_default:
            return (f"the {self.id_field!r} field: the rows have one, so it is the default "
                    "(--id-field overrides)")
        return f"the {self.id_field!r} field (--id-field)"


def output_schema(output_types: Sequence[str], output_dtype: str, dims: dict[str, int],
                  keep_fields: Sequence[str] = ()) -> pa.Schema:
    """The shards' schema: `id` (string), the kept input fields (strings), then columns.py's
    columns; a kept field named like another column is a ValueError."""
    base = schema_for(output_types, output_dtype, dims)
    taken = {"id", *base.names}
    clash = [f for f in keep_fields if f in taken]
    if clash:
        raise ValueError(f"--keep-fields: {clash[0]!r} is also an output column; the output "
                         f"columns are {', '.join(sorted(taken))}")
    return pa.schema([pa.field("id", pa.string(), nullable=False),
                      *(pa.field(f, pa.string()) for f in keep_fields), *base])


def _probe_dims(backend, output_types: Sequence[str]) -> dict[str, int]:
    """Vector widths from one tiny request (also fails fast on a wrong model or option)."""
    result = backend.submit(["dimension probe"]).result()[0]
    return {t: getattr(result, t).shape[-1] for t in ("dense", "multivector") if t in output_types}


_STOP = object()


class _Writer(threading.Thread):
    """Consumes ("batch", stats, ids, future) and ("end", stats) items in order; a shard
    without its "end" when the run stops is dropped (its temporary file removed)."""

    def __init__(self, job: Job, backend, out: OutputFolder, schema: pa.Schema,
                 dims: dict[str, int], progress: Progress):
        super().__init__(name="sie-corpus-writer", daemon=True)
        self.job, self.backend, self.out, self.schema, self.dims = job, backend, out, schema, dims
        self.progress = progress
        self.queue: queue.Queue = queue.Queue(maxsize=max(job.concurrency, 1))
        self.error: BaseException | None = None
        self._shard: ShardWriter | None = None

    def run(self) -> None:
        try:
            while (item := self.queue.get()) is not _STOP:
                self._handle(*item)
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            self.error = e
            while self.queue.get() is not _STOP:
                pass  # drain, so the reading thread never blocks on a dead writer
        finally:
            if self._shard is not None:
                self._shard.abort()

    def _writer_for(self, stats: ShardStats) -> ShardWriter:
        if self._shard is None:
            self._shard = self.out.writer(stats, self.schema, self.job.row_group_bytes)
        return self._shard

    def _handle(self, kind: str, stats: ShardStats, batch: _Batch | None = None) -> None:
        if kind == "end":
            self.out.finished(self._writer_for(stats).commit())
            self._shard = None
            self.progress.update(stats.skipped, 0)
            return
        try:
            results = _results(self.backend, batch.texts, batch.results, self.job.split_refused)
        except Exception as e:  # a refused batch, not split (Ray)
            if (reason := _refusal(e)) is None:
                raise
            raise BadRowError(f"rows {batch.positions[0]} to {batch.positions[-1]}: "
                              f"{reason}{_RAY_HINT}") from None
        ids, kept = [], []
        for row_id, position, row_kept, r in zip(batch.ids, batch.positions, batch.kept,
                                                 results, strict=True):
            if not isinstance(r, Refused):
                ids.append(row_id)
                kept.append(row_kept)
            elif self.job.on_bad_row == "fail":
                raise bad_row(position, row_id, r.reason)
            else:
                stats.skip(row_id)
        results = [r for r in results if not isinstance(r, Refused)]
        if not results:
            return
        cols = to_columns(results, self.job.output_types, self.job.output_dtype, self.dims)
        kept_cols = {f: pa.array([k[i] for k in kept], pa.string())
                     for i, f in enumerate(self.job.keep_fields)}
        table = pa.table({"id": pa.array(ids, pa.string()), **kept_cols, **cols},
                         schema=self.schema)
        self._writer_for(stats).append(table)
        tokens = int(cols["token_count"].to_numpy().sum())
        stats.rows += len(results)
        stats.tokens += tokens
        stats.truncated += int(cols["truncated"].to_numpy(zero_copy_only=False).sum())
        self.progress.update(len(results), tokens)

    def put(self, item: Any) -> None:
        """Queue an item (blocks while `concurrency` are queued); re-raises a writer error."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def stop(self) -> BaseException | None:
        """Finish the queued items, end the thread; the writer's error, if any."""
        self.queue.put(_STOP)
        self.join()
        return self.error


def _feed(job: Job, backend, out: OutputFolder, writer: _Writer, start: int) -> None:
    """Read rows from position `start`, submit batches, and mark shard ends, in order."""
    stats: ShardStats | None = None
    ids: list[str] = []
    positions: list[int] = []
    texts: list[str] = []
    kept: list[tuple[str | None, ...]] = []

    def flush() -> None:
        if texts:
            writer.put(("batch", stats, _Batch(list(ids), list(positions), list(texts),
                                               list(kept), _submit(backend, list(texts)))))
            for column in (ids, positions, texts, kept):
                column.clear()

    for row in read_rows(job.files, job.text_field, job.id_field, job.format, start,
                         job.keep_fields):
        k = row.position // job.shard_rows
        if k in out.done:
            continue
        if stats is None or k != stats.index:
            flush()
            if stats is not None:
                writer.put(("end", stats))
            stats = ShardStats(k, shard_name(k), k * job.shard_rows)
        if isinstance(row, BadRow):
            if job.on_bad_row == "fail":
                raise bad_row(row.position, row.id, row.reason)
            stats.skip(row.id)
            continue
        ids.append(row.id)
        positions.append(row.position)
        texts.append(row.text)
        kept.append(row.kept)
        if len(texts) >= job.batch_size:
            flush()
    flush()
    if stats is not None:
        writer.put(("end", stats))


def _count(job: Job, progress: Progress) -> None:
    """The total for the progress bar, read beside the run (a failure only loses the ETA:
    the reading thread reports unreadable inputs)."""
    try:
        progress.set_total(count_rows(job.files, job.format))
    except Exception:  # noqa: BLE001
        pass


def run(job: Job, backend, progress: Progress | None = None) -> dict[str, Any]:
    """Encode every row of `job.files` not yet in `job.output`; returns the run's summary."""
    started = time.monotonic()
    for path in job.files:
        file_format(path, job.format)  # an unknown format fails before any work
    dims = _probe_dims(backend, job.output_types)
    schema = output_schema(job.output_types, job.output_dtype, dims, job.keep_fields)
    info = {"backend": backend.name, "dims": dims, "ids": job.ids(),
            "schema": {f.name: str(f.type) for f in schema}}
    out = OutputFolder(job.output, job.config(backend.identity), info)
    if out.complete:
        return summary(out, 0, 0, time.monotonic() - started, already_complete=True)
    rows_before = sum(s.rows for s in out.done.values())
    progress = progress or Progress(sum(s.rows + s.skipped for s in out.done.values()),
                                    interval_s=job.log_interval_s)
    threading.Thread(target=_count, args=(job, progress), name="sie-corpus-count",
                     daemon=True).start()
    writer = _Writer(job, backend, out, schema, dims, progress)
    writer.start()
    first = next(k for k in range(len(out.done) + 1) if k not in out.done)
    try:
        _feed(job, backend, out, writer, first * job.shard_rows)
    finally:
        error = writer.stop()
        progress.close()
    if error is not None:
        raise error
    out.write_manifest("complete")
    rows = sum(s.rows for s in out.done.values()) - rows_before
    return summary(out, rows, progress.tokens, time.monotonic() - started)


def summary(out: OutputFolder, rows: int, tokens: int, seconds: float,
            already_complete: bool = False) -> dict[str, Any]:
    """The run's figures (this run's rows and tokens) and the folder's totals."""
    shards = list(out.done.values())
    return {"output": str(out.folder), "already_complete": already_complete,
            "rows_this_run": rows, "tokens_this_run": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
            "rows": sum(s.rows for s in shards), "tokens": sum(s.tokens for s in shards),
            "skipped": sum(s.skipped for s in shards),
            "skipped_first_ids": [i for s in shards for i in s.skipped_ids][:FIRST_BAD],
            "truncated": sum(s.truncated for s in shards), "shards": len(shards)}
