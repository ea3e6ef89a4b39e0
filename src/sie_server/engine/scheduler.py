"""Per-model scheduler: one queue of items, token-budget batches, one worker thread.

Items (not requests) are scheduled: a request's items may span batches and a batch mixes
requests. The worker takes whatever is queued, up to the token budget, the moment it is free:
a lone request is dispatched at once, and under load the queue fills while the device is busy
so batches grow to the budget (continuous batching). Tokenization happens before queueing, in
the submitting thread, so it overlaps the running batch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import numpy as np

from ..errors import InternalError, ModelUnavailable, Overloaded, DeadlineExceeded
from ..models.base import BatchOutputs, EncoderModel
from ..runtime.batch import pack, split_rows
from .request import ItemResult, Request

log = logging.getLogger(__name__)

Entry = tuple[Request, int]  # (request, item index)


class Scheduler:
    """Owns one model's queue and the thread that runs its batches."""

    def __init__(self, model: EncoderModel, *, max_batch_tokens: int, max_batch_items: int,
                 max_queued_tokens: int, on_batch: Callable[[int, int, float], None] | None = None) -> None:
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items
        self.max_queued_tokens = max_queued_tokens
        self.on_batch = on_batch
        self._queue: collections.deque[Entry] = collections.deque()
        self._queued_tokens = 0
        self._in_flight = 0  # items taken by the worker and not yet delivered
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"sched-{model.spec.name}",
                                        daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def busy(self) -> bool:
        """Work queued or running."""
        return bool(self._queue) or self._in_flight > 0

    def submit(self, request: Request) -> None:
        """Queue a request's items, or refuse at once with Overloaded when the queue is full."""
        tokens = request.num_tokens
        with self._cond:
            if self._closing:
                raise ModelUnavailable(f"{self.model.spec.name} is shutting down")
            if self._queue and self._queued_tokens + tokens > self.max_queued_tokens:
                raise Overloaded(f"{self.model.spec.name}: queue full "
                                 f"({self._queued_tokens} tokens waiting); retry later",
                                 retry_after=1.0)
            self._queue.extend((request, i) for i in range(len(request.tokens)))
            self._queued_tokens += tokens
            self._cond.notify()

    def close(self, drain: bool = True) -> None:
        """Stop the worker; with drain, after everything queued has run."""
        with self._cond:
            self._closing = True
            if not drain:
                for req, _ in self._queue:
                    req.fail(ModelUnavailable(f"{self.model.spec.name} was unloaded"))
                self._queue.clear()
            self._cond.notify_all()
        self._thread.join()

    def _take(self) -> list[Entry] | None:
        """Block until work is queued; pop items up to the token and item budgets."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            batch: list[Entry] = []
            tokens = 0
            now = time.monotonic()
            while self._queue and len(batch) < self.max_batch_items:
                req, i = self._queue[0]
                n = len(req.tokens[i])
                if batch and tokens + n > self.max_batch_tokens:
                    break
                self._queue.popleft()
                self._queued_tokens -= n
                if req.done():  # cancelled, failed or expired: drop before compute
                    continue
                if req.expired(now):
                    req.fail(DeadlineExceeded("the request's deadline passed while queued"))
                    continue
                batch.append((req, i))
                tokens += n
            self._in_flight = len(batch)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._execute(batch)
            with self._cond:
                self._in_flight = 0

    def _execute(self, batch: list[Entry]) -> None:
        """Run one batch; on OOM split it in halves and retry; never lose a request."""
        started = time.perf_counter()
        try:
            outputs = self.model.forward(self._pack(batch))
        except Exception as exc:  # noqa: BLE001 - every failure must resolve its requests
            if self.model.placement.is_oom(exc) and len(batch) > 1:
                log.warning("OOM on a batch of %d items; splitting", len(batch))
                self.model.placement.release_memory()
                half = len(batch) // 2
                self._execute(batch[:half])
                self._execute(batch[half:])
                return
            log.exception("batch of %d items failed", len(batch))
            err = (ModelUnavailable("the input does not fit in device memory")
                   if self.model.placement.is_oom(exc) else InternalError(f"inference failed: {exc}"))
            for req, _ in batch:
                req.fail(err)
            return
        if self.on_batch:
            self.on_batch(len(batch), sum(len(r.tokens[i]) for r, i in batch),
                          time.perf_counter() - started)
        self._deliver(batch, outputs)

    @staticmethod
    def _pack(batch: list[Entry]):
        types = frozenset().union(*{req.output_types for req, _ in batch})
        slots = np.fromiter((req.adapter_slot for req, _ in batch), dtype=np.int64, count=len(batch))
        return pack([req.tokens[i] for req, i in batch], types, slots)

    @staticmethod
    def _deliver(batch: list[Entry], out: BatchOutputs) -> None:
        sparse = None
        if out.sparse is not None:
            idx, val, counts = out.sparse
            sparse = list(zip(split_rows(idx, counts), split_rows(val, counts)))
        multi = split_rows(out.multivector[0], out.multivector[1]) if out.multivector else None
        for row, (req, i) in enumerate(batch):
            want = req.output_types
            req.complete(i, ItemResult(
                token_count=len(req.tokens[i]),
                truncated=req.original_lengths[i] > len(req.tokens[i]),
                dense=out.dense[row] if out.dense is not None and "dense" in want else None,
                sparse=sparse[row] if sparse is not None and "sparse" in want else None,
                multivector=multi[row] if multi is not None and "multivector" in want else None,
            ))
