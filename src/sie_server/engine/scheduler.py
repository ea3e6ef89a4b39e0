"""Per-model scheduler: fair queues of items, token-budget batches, two worker threads.

Items (not requests) are scheduled: a request's items may span batches and a batch mixes
requests. The compute thread takes whatever is queued, up to the token budget, the moment it is
free: a lone request is dispatched at once, and under load the queue fills while the device is
busy so batches grow to the budget (continuous batching). Tokenization happens before queueing,
in the submitting thread, so it overlaps the running batch.

Fairness (`fair_queue.py`): queued work is grouped by client, the request's tenant (its API
key) or, without one, the request itself, and batches are formed by deficit round robin over
clients with credit in tokens. A small request arriving behind a giant one, whatever the giant
one's item lengths, runs in one of the next C + 1 batches (C: clients with queued work).

Admission, in `submit` only. A request of more than `max_queued_tokens` (L) tokens is refused
at once (413: it could never be queued whole). Any other request is queued while the queue
holds fewer than L tokens, whatever its own size (so it may take the queue past L by one
request); past L, while its client holds less than a fair share (L / clients waiting) and the
queue fewer than 2L tokens: one client filling the queue does not lock the others out, and a
client with nothing queued (every request, without API keys) gets in up to 2L. Else 503
QUEUE_FULL with Retry-After. The decision reads only what is already queued, never the size of
the request, so a large request is refused exactly when a small one from the same client
would be: a stream of small requests cannot starve a larger one. The queue never holds more
than 3L tokens.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time

import numpy as np

from ..errors import (BodyTooLarge, InternalError, ModelUnavailable, Overloaded,
                      ResourceExhausted)
from ..metrics import Metrics
from ..models.base import BatchOutputs, EncoderModel
from ..runtime.batch import pack, split_rows
from .fair_queue import Entry, FairQueue, client_key
from .request import ItemResult, Request

log = logging.getLogger(__name__)


class Scheduler:
    """Owns one model's queue and two threads: `compute` forms batches and launches the
    forward, `deliver` waits for each batch's outputs on the host and resolves requests.
    The bounded hand-off between them lets batch N+1 launch while batch N is copied out."""

    def __init__(self, model: EncoderModel, *, max_batch_tokens: int, max_batch_items: int,
                 max_queued_tokens: int, metrics: Metrics | None = None) -> None:
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items
        self.max_queued_tokens = max_queued_tokens
        self.metrics = metrics or Metrics()
        self._label = model.spec.name
        self._queue = FairQueue(max_batch_tokens, max_batch_items)
        self._in_flight = 0  # items taken from the queue and not yet resolved
        self._cond = threading.Condition()
        self._closing = False
        self._handoff: queue.Queue[tuple[list[Entry], BatchOutputs, float] | None] = queue.Queue(2)
        name = model.spec.name
        # each in an empty context: no request id of whoever loaded the model in their logs
        self._threads = [threading.Thread(target=contextvars.Context().run, args=(loop,),
                                          name=f"{what}-{name}", daemon=True)
                         for what, loop in (("compute", self._compute_loop),
                                            ("deliver", self._deliver_loop))]
        for t in self._threads:
            t.start()

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    @property
    def busy(self) -> bool:
        """Work queued or running."""
        return bool(self._queue) or self._in_flight > 0

    def submit(self, request: Request) -> None:
        """Queue a request's items, or refuse it at once (see the module docstring)."""
        tokens, limit, name = request.num_tokens, self.max_queued_tokens, self.model.spec.name
        with self._cond:
            if self._closing:
                raise ModelUnavailable(f"{name} is shutting down")
            if tokens > limit:
                self.metrics.rejected.labels(self._label, "too_large").inc()
                raise BodyTooLarge(f"the request holds {tokens} tokens; {name} queues at most "
                                   f"{limit} (--max-queued-tokens): send its items in smaller "
                                   "requests")
            holding = self._queue.holding(client_key(request))
            if not self._admits(holding):
                self.metrics.rejected.labels(self._label, "queue_full").inc()
                raise Overloaded(f"{name}: queue full ({self._queue.tokens} tokens waiting, "
                                 f"limit {limit}; this client holds {holding or 0}); retry later",
                                 retry_after=1.0)
            self._queue.push(request)
            self.metrics.queue_tokens.labels(self._label).set(self._queue.tokens)
            self._cond.notify()

    def _admits(self, holding: int | None) -> bool:
        """Whether a client holding `holding` queued tokens (None: nothing queued) may queue
        one more request (the module docstring); independent of the request's size."""
        queued, limit = self._queue.tokens, self.max_queued_tokens
        if queued < limit:
            return True
        if queued >= 2 * limit:
            return False
        if holding is None:
            return True  # it holds nothing: below any share
        return holding < limit / len(self._queue)

    def close(self, drain: bool = True) -> None:
        """Stop the threads; with drain, after everything queued has run."""
        with self._cond:
            self._closing = True
            if not drain:
                for request in self._queue.clear():
                    request.fail(ModelUnavailable(f"{self.model.spec.name} was unloaded"))
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def _take(self) -> list[Entry] | None:
        """Block until work is queued; the next batch from the fair queue."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            now = time.monotonic()
            batch = self._queue.take(now)
            batch.sort(key=lambda entry: entry[0].adapter_slot)  # each adapter's rows contiguous
            for req in {id(r): r for r, _ in batch}.values():
                self.metrics.queue_seconds.labels(self._label).observe(now - req.enqueued_at)
            self.metrics.queue_tokens.labels(self._label).set(self._queue.tokens)
            self._in_flight += len(batch)
            return batch

    def _finished(self, batch: list[Entry]) -> None:
        with self._cond:
            self._in_flight -= len(batch)

    def _compute_loop(self) -> None:
        try:
            while (batch := self._take()) is not None:
                if batch:
                    self._launch(batch)
        finally:
            self._handoff.put(None)

    def _launch(self, batch: list[Entry]) -> None:
        """Start one batch's forward; on OOM split it in halves and retry; never lose a request."""
        started = time.perf_counter()
        now = time.monotonic()
        for req, _ in batch:
            if req.timing.launched is None:
                req.timing.launched = now
        try:
            outputs = self.model.forward(self._pack(batch))
        except Exception as exc:  # noqa: BLE001 - every failure must resolve its requests
            oom = self.model.placement.is_oom(exc)
            if oom and len(batch) > 1:
                log.warning("OOM on a batch of %d items; splitting", len(batch))
                self.metrics.oom_splits.labels(self._label).inc()
                self.model.placement.release_memory()
                half = len(batch) // 2
                self._launch(batch[:half])
                self._launch(batch[half:])
                return
            log.exception("batch of %d items failed", len(batch))
            self._fail(batch, ResourceExhausted("the input does not fit in device memory",
                                                retry_after=5) if oom
                       else InternalError(f"inference failed: {type(exc).__name__}: {exc}"))
            return
        self._handoff.put((batch, outputs, started))

    def _deliver_loop(self) -> None:
        while (item := self._handoff.get()) is not None:
            batch, outputs, started = item
            try:
                host = outputs.to_host()
                now = time.monotonic()
                for req, _ in batch:
                    req.timing.computed = now
                m, label = self.metrics, self._label
                m.inference_seconds.labels(label).observe(time.perf_counter() - started)
                m.batch_items.labels(label).observe(len(batch))
                m.batch_tokens.labels(label).observe(sum(len(r.tokens[i]) for r, i in batch))
                self._deliver(batch, host)
            except Exception as exc:  # noqa: BLE001
                log.exception("delivering a batch of %d items failed", len(batch))
                self._fail(batch, InternalError(f"inference failed: {type(exc).__name__}: {exc}"))
                continue
            self._finished(batch)

    def _fail(self, batch: list[Entry], err: Exception) -> None:
        for req, _ in batch:
            req.fail(err)
        self._finished(batch)

    @staticmethod
    def _pack(batch: list[Entry]):
        types = frozenset().union(*{req.output_types for req, _ in batch})
        slots = np.fromiter((req.adapter_slot for req, _ in batch), dtype=np.int64, count=len(batch))
        token_types = None
        if any(req.token_types is not None for req, _ in batch):
            token_types = [req.token_types[i] if req.token_types is not None
                           else np.zeros(len(req.tokens[i]), dtype=np.int64) for req, i in batch]
        raw = np.flatnonzero([req.raw for req, _ in batch]) if any(
            req.raw for req, _ in batch) else None
        poolings = {req.pooling for req, _ in batch} - {None}
        pooling_rows = {mode: np.flatnonzero([req.pooling == mode for req, _ in batch])
                        for mode in poolings}
        return pack([req.tokens[i] for req, i in batch], types, slots, token_types, raw,
                    pooling_rows)

    @staticmethod
    def _deliver(batch: list[Entry], out: BatchOutputs) -> None:
        sparse = None
        if out.sparse is not None:
            idx, val, counts = out.sparse
            sparse = list(zip(split_rows(idx, counts), split_rows(val, counts)))
        multi = None
        if out.multivector is not None:
            rows, counts, skip = out.multivector
            multi = [m[skip:] for m in split_rows(rows, counts)]
        for row, (req, i) in enumerate(batch):
            want = req.output_types
            req.complete(i, ItemResult(
                token_count=len(req.tokens[i]),
                truncated=req.original_lengths[i] > len(req.tokens[i]),
                dense=out.dense[row] if out.dense is not None and "dense" in want else None,
                sparse=sparse[row] if sparse is not None and "sparse" in want else None,
                multivector=multi[row] if multi is not None and "multivector" in want else None,
                score=float(out.scores[row]) if out.scores is not None and "score" in want else None,
            ))
