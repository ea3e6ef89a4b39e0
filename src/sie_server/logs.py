"""Structured (JSON lines) logging with the request id of the request being served."""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message (+ extra fields)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                 "level": record.levelname, "logger": record.name,
                 "request_id": request_id.get(), "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    _threads_keep_request_id()


def _threads_keep_request_id() -> None:
    """A thread started while a request is served logs with that request's id (e.g. the load
    of the adapter it asked for, and that load's failure): Python before 3.14 starts threads
    in an empty context. Threads serving every request (the schedulers') start clean."""
    if getattr(threading.Thread.start, "keeps_request_id", False):
        return
    start = threading.Thread.start

    def start_keeping_id(self: threading.Thread) -> None:
        rid = request_id.get()
        if rid != "-":
            run = self.run
            self.run = lambda: (request_id.set(rid), run())[1]  # type: ignore[method-assign]
        start(self)

    start_keeping_id.keeps_request_id = True  # type: ignore[attr-defined]
    threading.Thread.start = start_keeping_id  # type: ignore[method-assign]
