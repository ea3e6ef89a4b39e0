"""Progress of a run: a tqdm bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Rows done (of `total` once known), tokens/s and ETA; `initial` rows were done by an
    earlier run. Thread-safe."""

    def __init__(self, initial: int = 0, stream: TextIO | None = None,
                 interval_s: float = 10.0, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval_s = interval_s
        self.initial = initial
        self.rows = initial
        self.tokens = 0
        self.total: int | None = None
        self.started = time.monotonic()
        self._last_line = self.started
        self._lock = threading.Lock()
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(initial=initial, unit="rows", file=self.stream, dynamic_ncols=True,
                             smoothing=0.1)

    def set_total(self, total: int) -> None:
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def update(self, rows: int, tokens: int) -> None:
        with self._lock:
            self.rows += rows
            self.tokens += tokens
            if self._bar is not None:
                self._bar.set_postfix_str(f"{self.tokens_per_s():,.0f} tok/s", refresh=False)
                self._bar.update(rows)
            elif time.monotonic() - self._last_line >= self.interval_s:
                self._last_line = time.monotonic()
                print(self.line(), file=self.stream, flush=True)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.monotonic() - self.started, 1e-9)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        done = self.rows - self.initial
        text = f"encode: {self.rows:,}"
        if self.total:
            text += f"/{self.total:,} rows ({100 * self.rows / self.total:.1f}%)"
            if done:
                text += f", ETA {_clock((self.total - self.rows) * elapsed / done)}"
        else:
            text += " rows"
        return text + f", {done / max(elapsed, 1e-9):,.0f} rows/s, {self.tokens_per_s():,.0f} tokens/s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
