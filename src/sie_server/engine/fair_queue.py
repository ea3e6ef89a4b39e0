"""Queued items grouped by client, and batches formed from them by deficit round robin.

Clients (a tenant, else a request: `client_key`) stand in a ring. The client at its head has
the turn: a turn starts by adding a quantum of credit, `Q = max_batch_tokens // 4`, capped at
the larger of `Q` and the cost of the client's next item (cost = its tokens), and serves the
client's items in order while their cost is covered by the credit. The turn ends when the next
item costs more than what is left (the client goes to the back of the ring and keeps its
credit) or when the client has nothing left (it leaves the ring, its credit with it). When the
next item is covered but does not fit in the batch (token or item budget), the batch is closed
and the next batch starts with the rest of the same turn, once the next few of the client's
other requests have filled what they can of the batch within the same credit. Within a client
its requests take turns: after each of its turns that served something the client's requests
rotate.

The cap makes a turn serve at most max(Q, one item) tokens: either items of at most Q tokens in
all, or one item longer than Q, which its client buys with the credit of several turns (an item
longer than `max_batch_tokens` runs in a batch of its own). Credit is in tokens, so a client of
8,192-token documents and a client of short queries each get about half of the tokens computed:
neither starves the other. A turn of at most Q tokens spills over into at most one more batch,
and a turn of one item fills one batch, so each turn touches at most two batches and consecutive
turns share one. Hence the bound: a request whose items hold at most Q tokens each, from a
client with nothing else queued, has its first item in one of the first C + 1 batches formed
after it is queued, C being the number of clients with queued work (itself included); a longer
first item needs ceil(tokens / Q) turns of its client. The batch budget in items
(`max_batch_items`) is assumed not to close a batch before its tokens do.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

from ..errors import DeadlineExceeded
from .request import Request

Entry = tuple[Request, int]  # (request, item index)
_FILLERS = 8  # how many of a client's other requests may fill a batch: a bounded look


@dataclass(eq=False)
class _Pending:
    """A queued request: its next item and the tokens it still has queued."""

    request: Request
    tokens: int
    next: int = 0

    def cost(self) -> int:
        return len(self.request.tokens[self.next])


@dataclass(eq=False)
class _Client:
    """One client's queued requests (served in turn), its credit and whether its turn is on."""

    requests: collections.deque[_Pending] = field(default_factory=collections.deque)
    tokens: int = 0
    credit: int = 0
    in_turn: bool = False


def client_key(request: Request) -> object:
    """Who a request counts against: its tenant, else the request itself."""
    return ("tenant", request.tenant) if request.tenant is not None else ("request", id(request))


class FairQueue:
    """Not thread-safe: the scheduler holds its lock around every call."""

    def __init__(self, max_batch_tokens: int, max_batch_items: int) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items
        self.quantum = max(1, max_batch_tokens // 4)
        self.tokens = 0  # queued, in all
        self._ring: collections.OrderedDict[object, _Client] = collections.OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._ring)

    def __len__(self) -> int:
        """Clients with queued work."""
        return len(self._ring)

    def holding(self, key: object) -> int | None:
        """Tokens queued by client `key`, None when it has nothing queued."""
        client = self._ring.get(key)
        return client.tokens if client is not None else None

    def push(self, request: Request) -> None:
        client = self._ring.get(key := client_key(request))
        if client is None:
            client = self._ring[key] = _Client()
        tokens = request.num_tokens
        client.requests.append(_Pending(request, tokens))
        client.tokens += tokens
        self.tokens += tokens

    def clear(self) -> list[Request]:
        """Forget everything queued; returns the requests that were waiting."""
        waiting = [p.request for c in self._ring.values() for p in c.requests]
        self._ring.clear()
        self.tokens = 0
        return waiting

    def take(self, now: float) -> list[Entry]:
        """The next batch (empty only when every queued request was dropped)."""
        batch: list[Entry] = []
        tokens = 0
        while self._ring and len(batch) < self.max_batch_items:
            key, client = next(iter(self._ring.items()))
            pending = self._head(client, now)
            if pending is None:
                del self._ring[key]
                continue
            if not client.in_turn:
                client.in_turn = True
                client.credit = min(client.credit + self.quantum,
                                    max(self.quantum, pending.cost()))
            served = False
            while pending is not None and (n := pending.cost()) <= client.credit:
                if batch and (tokens + n > self.max_batch_tokens
                              or len(batch) >= self.max_batch_items):
                    if len(batch) >= self.max_batch_items or (filler := self._filler(
                            client, self.max_batch_tokens - tokens, now)) is None:
                        return batch  # the turn goes on in the next batch
                    n = filler.cost()
                    batch.append((filler.request, filler.next))
                    tokens += n
                    client.credit -= n
                    self._spend(client, filler, n)
                    continue
                batch.append((pending.request, pending.next))
                tokens += n
                client.credit -= n
                self._spend(client, pending, n)
                pending, served = self._head(client, now), True
            client.in_turn = False
            if client.requests:
                if served:  # a request saving up for a long item keeps its place
                    client.requests.rotate(-1)
                self._ring.move_to_end(key)
            else:
                del self._ring[key]
        return batch

    def _spend(self, client: _Client, pending: _Pending, n: int) -> None:
        pending.next += 1
        pending.tokens -= n
        client.tokens -= n
        self.tokens -= n
        if pending.next == len(pending.request.tokens):
            client.requests.remove(pending)

    def _filler(self, client: _Client, room: int, now: float) -> _Pending | None:
        """One of the next few live requests of the client in turn whose next item fits in
        `room` tokens and is covered by its credit: it fills the batch that the turn's next item
        does not fit in."""
        limit = min(room, client.credit)
        return next((p for p in itertools.islice(client.requests, 1, 1 + _FILLERS)
                     if not p.request.done() and not p.request.expired(now)
                     and p.cost() <= limit), None)

    def _head(self, client: _Client, now: float) -> _Pending | None:
        """The client's current request, dropping those cancelled, failed or expired."""
        while client.requests:
            pending = client.requests[0]
            req = pending.request
            if req.expired(now) and not req.done():
                req.fail(DeadlineExceeded("the request's deadline passed while queued"))
            if not req.done():
                return pending
            client.requests.popleft()
            client.tokens -= pending.tokens
            self.tokens -= pending.tokens
        return None
