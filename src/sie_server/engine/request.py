"""Request bookkeeping shared by the engine and the scheduler."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ItemResult:
    """One item's outputs; only the requested output types are set."""

    token_count: int
    truncated: bool
    dense: np.ndarray | None = None
    sparse: tuple[np.ndarray, np.ndarray] | None = None  # (indices int32, values float32)
    multivector: np.ndarray | None = None  # (tokens, dim)
    score: float | None = None  # pair scoring models (cross-encoders): the raw score


@dataclass
class Timing:
    """Where one request's time went, as `time.monotonic()` stamps set along its way:
    submitted -> tokenized -> queued -> first batch launched -> last batch on the host ->
    result ready. `sie()` gives SIE's TimingInfo (milliseconds)."""

    submitted: float = field(default_factory=time.monotonic)
    tokenization_s: float = 0.0  # tokenizing (and image preprocessing), in the submitter
    queued: float | None = None
    launched: float | None = None  # its first batch's forward started
    computed: float | None = None  # its last batch's outputs reached the host
    finished: float | None = None  # results (or scores) complete

    def sie(self, started: float | None = None) -> dict[str, float]:
        """SIE's TimingInfo: `total_ms` from `started` (default: submission) to now; the
        parts are disjoint intervals inside it."""
        now = time.monotonic()
        launched = self.launched or self.queued or now
        computed = self.computed or launched
        finished = self.finished or computed
        ms = lambda a, b: max(0.0, (b - a) * 1000.0)  # noqa: E731
        return {"total_ms": ms(self.submitted if started is None else started, now),
                "queue_ms": ms(self.queued or launched, launched),
                "tokenization_ms": self.tokenization_s * 1000.0,
                "inference_ms": ms(launched, computed),
                "postprocessing_ms": ms(computed, finished)}


class TimedFuture(Future):
    """The future of a request, with the request's `timing`."""

    def __init__(self, timing: Timing | None = None) -> None:
        super().__init__()
        self.timing = timing or Timing()


@dataclass(eq=False)
class Request:
    """Tokenized items waiting for compute; resolves `future` once every item is done."""

    tokens: list[np.ndarray]  # per item: token ids, or an image's uint8 patches (2-D)
    original_lengths: list[int]
    output_types: frozenset[str]
    adapter_slot: int = -1
    deadline: float | None = None  # time.monotonic() value
    token_types: list[np.ndarray] | None = None  # per item, for sentence pairs
    tenant: str | None = None  # who sent it (an API key's identity): fair share per tenant
    raw: bool = False  # normalize: false: vectors as computed (PackedBatch.raw_rows)
    pooling: str | None = None  # another pooling than the model's (PackedBatch.pooling_rows)
    enqueued_at: float = field(default_factory=time.monotonic)
    future: TimedFuture = field(default_factory=TimedFuture)
    results: list[ItemResult | None] = field(init=False)
    remaining: int = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.tokens)
        self.remaining = len(self.tokens)

    @property
    def timing(self) -> Timing:
        return self.future.timing

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) > self.deadline

    def done(self) -> bool:
        return self.future.done()

    def fail(self, exc: BaseException) -> None:
        with self._lock, contextlib.suppress(InvalidStateError):  # already cancelled
            self.future.set_exception(exc)

    def complete(self, index: int, result: ItemResult) -> None:
        """Store one item's result; the last one resolves the future."""
        with self._lock:
            if self.future.done():
                return
            self.results[index] = result
            self.remaining -= 1
            if self.remaining == 0:
                self.timing.finished = time.monotonic()
                with contextlib.suppress(InvalidStateError):
                    self.future.set_result(self.results)
