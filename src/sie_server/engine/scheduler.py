"""Per-model scheduler: fair queues of items, token-budget batches, two worker threads.

Items (not requests) are scheduled: a request's items may span batches and a batch mixes
requests. The compute thread takes whatever is queued, up to the token budget, the moment it is
free: a lone request is dispatched at once, and under load the queue fills while the device is
busy so batches grow to the budget (continuous batching). Tokenization happens before queueing,
in the submitting thread, so it overlaps the running batch.

Fairness: queued work is grouped by client, the request's tenant (its API key) or, without one,
the request itself. A batch is filled by deficit round robin over clients (each turn adds
`max_batch_tokens // 4` tokens of credit; a client spends it on its items) and, within a
client, round robin over its requests. So a small request arriving behind a giant one joins the
next batch instead of waiting for the giant one to finish.

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

import collections
import contextvars
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import (BodyTooLarge, DeadlineExceeded, InternalError, ModelUnavailable,
                      Overloaded, ResourceExhausted)
from ..metrics import Metrics
from ..models.base import BatchOutputs, EncoderModel
from ..runtime.batch import pack, split_rows
from .request import ItemResult, Request

log = logging.getLogger(__name__)

Entry = tuple[Request, int]  # (request, item index)


@dataclass(eq=False)
class _Pending:
    """A queued request: its next item and the tokens it still has queued."""

    request: Request
    tokens: int
    next: int = 0


@dataclass(eq=False)
class _Client:
    """One client's queued requests (served in turn) and its round-robin credit."""

    requests: collections.deque[_Pending] = field(default_factory=collections.deque)
    tokens: int = 0
    deficit: int = 0


def client_key(request: Request) -> object:
    """Who a request counts against: its tenant, else the request itself."""
    return ("tenant", request.tenant) if request.tenant is not None else ("request", id(request))


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
        self._clients: collections.OrderedDict[object, _Client] = collections.OrderedDict()
        self._queued_tokens = 0
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
        return bool(self._clients) or self._in_flight > 0

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
            key = client_key(request)
            client = self._clients.get(key)
            holding = client.tokens if client is not None else 0
            if not self._admits(client):
                self.metrics.rejected.labels(self._label, "queue_full").inc()
                raise Overloaded(f"{name}: queue full ({self._queued_tokens} tokens waiting, "
                                 f"limit {limit}; this client holds {holding}); retry later",
                                 retry_after=1.0)
            if client is None:
                client = self._clients[key] = _Client()
            client.requests.append(_Pending(request, tokens))
            client.tokens += tokens
            self._queued_tokens += tokens
            self.metrics.queue_tokens.labels(self._label).set(self._queued_tokens)
            self._cond.notify()

    def _admits(self, client: _Client | None) -> bool:
        """Whether `client` (None: one with nothing queued) may queue one more request (the
        module docstring); independent of the request's size."""
        queued, limit = self._queued_tokens, self.max_queued_tokens
        if queued < limit:
            return True
        if queued >= 2 * limit:
            return False
        if client is None:
            return True  # it holds nothing: below any share
        return client.tokens < limit / len(self._clients)

    def close(self, drain: bool = True) -> None:
        """Stop the threads; with drain, after everything queued has run."""
        with self._cond:
            self._closing = True
            if not drain:
                for client in self._clients.values():
                    for pending in client.requests:
                        pending.request.fail(ModelUnavailable(f"{self.model.spec.name} was unloaded"))
                self._clients.clear()
                self._queued_tokens = 0
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def _drop(self, client: _Client, pending: _Pending) -> None:
        """Forget a request's queued items (it is done, or taken whole)."""
        client.requests.remove(pending)
        client.tokens -= pending.tokens
        self._queued_tokens -= pending.tokens
        pending.tokens = 0

    def _head(self, client: _Client, now: float) -> _Pending | None:
        """The client's current request, dropping those cancelled, failed or expired."""
        while client.requests:
            pending = client.requests[0]
            req = pending.request
            if req.expired(now) and not req.done():
                req.fail(DeadlineExceeded("the request's deadline passed while queued"))
            if not req.done():
                return pending
            self._drop(client, pending)
        return None

    def _take(self) -> list[Entry] | None:
        """Block until work is queued; fill a batch up to the token and item budgets by
        deficit round robin over clients (module docstring)."""
        with self._cond:
            while not self._clients and not self._closing:
                self._cond.wait()
            if not self._clients:
                return None
            batch: list[Entry] = []
            now = time.monotonic()
            tokens, progress = 0, True
            while self._clients and len(batch) < self.max_batch_items and (
                    progress or self._could_add(tokens)):  # else: the batch is full
                progress = False
                for key in list(self._clients):
                    client = self._clients[key]
                    added = self._serve(client, batch, tokens, now)
                    tokens, progress = tokens + added, progress or added > 0
                    if client.requests:
                        client.requests.rotate(-1)  # its requests take turns
                        self._clients.move_to_end(key)
                    else:
                        del self._clients[key]
            batch.sort(key=lambda entry: entry[0].adapter_slot)  # each adapter's rows contiguous
            for req in {id(r): r for r, _ in batch}.values():
                self.metrics.queue_seconds.labels(self._label).observe(now - req.enqueued_at)
            self.metrics.queue_tokens.labels(self._label).set(self._queued_tokens)
            self._in_flight += len(batch)
            return batch

    def _serve(self, client: _Client, batch: list[Entry], tokens: int, now: float) -> int:
        """One turn of `client`: add a quantum of credit and spend it on its items (an empty
        batch always takes one); returns the tokens added to `batch`."""
        pending = self._head(client, now)
        if pending is None:
            return 0
        client.deficit = min(client.deficit + max(1, self.max_batch_tokens // 4),
                             self.max_batch_tokens)
        added = 0
        while pending is not None and len(batch) < self.max_batch_items:
            req, i = pending.request, pending.next
            n = len(req.tokens[i])
            if batch and (tokens + added + n > self.max_batch_tokens or n > client.deficit):
                break
            batch.append((req, i))
            added += n
            client.deficit -= n
            pending.next += 1
            pending.tokens -= n
            client.tokens -= n
            self._queued_tokens -= n
            if pending.next == len(req.tokens):
                client.requests.popleft()
                pending = self._head(client, now)
        return added

    def _could_add(self, tokens: int) -> bool:
        """Whether some client's next item fits beside `tokens` (it may lack credit yet)."""
        return any(len(c.requests[0].request.tokens[c.requests[0].next]) + tokens
                   <= self.max_batch_tokens for c in self._clients.values() if c.requests)

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
        return pack([req.tokens[i] for req, i in batch], types, slots, token_types)

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
