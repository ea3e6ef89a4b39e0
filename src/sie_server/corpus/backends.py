"""Where texts are encoded: the in-process engine, or a server through the SDK.

A backend's `submit(texts)` returns a Future of one `ItemResult` per text, in order, and
never blocks for long: the caller keeps many in flight so the engine's scheduler (or the
server's) batches them while the next ones are read and tokenized.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from ..engine.request import ItemResult

log = logging.getLogger("sie.corpus")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".model", ".txt")


def weights_digest(folder: Path) -> str:
    """sha256 over the model folder's weight, config and tokenizer files (names and bytes)."""
    total = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        with open(path, "rb") as f:
            total.update(f"{path.relative_to(folder)}\0".encode())
            total.update(hashlib.file_digest(f, "sha256").digest())
    return total.hexdigest()


def model_identity(settings, model: str, dtype: str | None) -> dict[str, Any]:
    """What the manifest records of a local model: name, family, weights digest, hub revision."""
    from ..engine.catalog import load_catalog, spec_for_source
    from ..engine.profiles import split_ref
    from ..engine.sources import resolve

    specs, _ = load_catalog(settings.catalog_files)
    base, _profile = split_ref(model, {**specs, **settings.models})  # the name keeps it
    source = settings.models.get(base)
    spec = spec_for_source(base, source, specs.get(base)) if source else specs.get(base)
    if spec is None:
        raise ValueError(f"model {model!r} is not in the catalog; pass --model NAME=PATH")
    folder = resolve(spec.name, spec.source, spec.family, settings.allow_download)
    revision = re.search(r"snapshots/([0-9a-f]{40})", str(folder))
    return {"name": model, "family": spec.family, "weights_sha256": weights_digest(folder),
            "revision": revision.group(1) if revision else None, "dtype": dtype}


class _Parts:
    """The Futures of one batch's consecutive parts, read as one."""

    def __init__(self, parts: list[Future]) -> None:
        self.parts = parts

    def result(self) -> list[ItemResult]:
        return [r for part in self.parts for r in part.result()]


class InProcessBackend:
    """The engine in this process (loads the model on start)."""

    name = "in-process"

    def __init__(self, engine, model: str, output_types: Sequence[str], options: dict[str, Any]):
        from ..errors import Overloaded

        self.engine, self.model = engine, model
        self.output_types, self.options = list(output_types), options
        self._overloaded = Overloaded
        info = engine.registry.get(model).model.info  # load now: a missing model fails early
        # texts per engine request, so that none holds more tokens than the queue takes (256
        # texts of 8,192 tokens are over the default 2,000,000: refused whole, 413)
        self.per_request = max(1, engine.settings.max_queued_tokens // info.max_input_tokens)
        self.identity = model_identity(engine.settings, model,
                                       engine.placement.dtype_name)

    def submit(self, texts: list[str]) -> Future | _Parts:
        n = self.per_request
        parts = [self._submit(texts[i:i + n]) for i in range(0, len(texts), n)]
        return parts[0] if len(parts) == 1 else _Parts(parts)

    def _submit(self, texts: list[str]) -> Future:
        while True:
            try:
                return self.engine.submit(self.model, texts, self.output_types, self.options)
            except self._overloaded:  # the model's queue is full: let it drain
                time.sleep(0.02)

    def close(self) -> None:
        self.engine.close()


class RayBackend:
    """Ray Data actors (`sie_server.ray.data.embed_dataset`), each holding an Engine built
    from `settings`. One Dataset per submitted batch, so the caller submits whole shards."""

    name = "ray"

    def __init__(self, address: str | None, settings, model: str, output_types: Sequence[str],
                 options: dict[str, Any], num_actors: int = 2, num_cpus: float = 0.5,
                 num_gpus: float = 0, batch_size: int = 64):
        from ..ray import cluster

        cluster.connect(address)
        self.settings, self.model = settings, model
        self.output_types, self.options = list(output_types), options
        self.actor_args = {"num_actors": num_actors, "num_cpus": num_cpus, "num_gpus": num_gpus,
                           "batch_size": batch_size}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sie-corpus-ray")
        dtype = None if settings.dtype == "auto" else settings.dtype
        self.identity = model_identity(settings, model, dtype)

    def submit(self, texts: list[str]) -> Future:
        return self.pool.submit(self._encode, texts)

    def _encode(self, texts: list[str]) -> list[ItemResult]:
        import pyarrow as pa
        import ray

        from ..columns import from_columns
        from ..ray.data import embed_dataset

        ds = ray.data.from_arrow(pa.table({"text": pa.array(texts, pa.string())}))
        out = embed_dataset(ds, self.model, self.output_types, self.options, self.settings,
                            **self.actor_args)
        try:
            table = pa.concat_tables(ray.get(out.to_arrow_refs()))
        except Exception as e:
            engine_error = _engine_error(e)
            if engine_error is None:
                raise
            raise engine_error from e
        if table.num_rows != len(texts):
            raise RuntimeError(f"Ray returned {table.num_rows} rows for {len(texts)} texts")
        return from_columns(table)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class ServerBackend:
    """A running `sie-server` over HTTP (the SDK): 429, 503 (QUEUE_FULL, MODEL_LOADING, ...),
    other 5xx and lost connections are
    retried with backoff for up to `retry_s` seconds without any success (a server restart
    mid-run is waited out); other errors fail the run."""

    name = "server"

    def __init__(self, url: str, model: str, output_types: Sequence[str], options: dict[str, Any],
                 api_key: str | None = None, concurrency: int = 8, retry_s: float = 300.0,
                 timeout_s: float = 600.0):
        from sie_sdk import SIEClient

        self.model, self.output_types, self.options = model, list(output_types), options
        self.retry_s = retry_s
        # retries are this backend's (one window, `retry_s`, for refusals, 5xx and restarts)
        self.client = SIEClient(url, api_key=api_key, timeout=timeout_s, max_retries=0,
                                max_items_per_request=1 << 20, max_concurrency=1)
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="sie-corpus")
        self.identity = {"name": model, "family": None, "weights_sha256": None,
                         "revision": None, "dtype": None}
        self.url = url

    def submit(self, texts: list[str]) -> Future:
        return self.pool.submit(self._encode, texts)

    def _encode(self, texts: list[str]) -> list[ItemResult]:
        from sie_sdk.errors import SIEConnectionError, SIEServerError

        deadline = time.monotonic() + self.retry_s
        delay = 0.1
        while True:
            try:
                out = self.client.encode(self.model, texts, self.output_types, self.options)
                return [_item_result(r) for r in out]
            except (SIEConnectionError, SIEServerError) as e:
                status = getattr(e, "status", None)
                retryable = status is None or status == 429 or status >= 500
                if not retryable or time.monotonic() > deadline:
                    raise
                wait = getattr(e, "retry_after", None) or delay
                log.warning("server: %s; retrying in %.1fs", e, wait)
                time.sleep(min(wait, max(deadline - time.monotonic(), 0.0) + 0.01))
                delay = min(delay * 2, 5.0)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()


_ENGINE_ERROR = re.compile(r"^sie_server\.errors\.(\w+): (.*)$", re.M)


def _engine_error(e: BaseException):
    """The engine's error (a refused text, an unknown adapter) that an Embedder raised, rebuilt
    from the traceback text, the only form in which Ray Data passes it on; or None."""
    from .. import errors

    found = _ENGINE_ERROR.findall(str(e))
    cls = getattr(errors, found[-1][0], None) if found else None
    if isinstance(cls, type) and issubclass(cls, errors.SIEError):
        return cls(found[-1][1])
    return None


def _item_result(r: dict[str, Any]) -> ItemResult:
    sparse = r.get("sparse")
    return ItemResult(int(r["token_count"]), bool(r["truncated"]), dense=r.get("dense"),
                      sparse=(sparse["indices"], sparse["values"]) if sparse else None,
                      multivector=r.get("multivector"))
