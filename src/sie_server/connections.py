"""Connection limits of the HTTP server: uvicorn's httptools protocol with bounds on what a
client may hold without sending a request.

- a request head (request line + headers) must arrive within `header_timeout_s` of the
  connection opening or the previous exchange ending (its response sent and its body read:
  a 413 may go out before the body arrives), and hold at most `max_header_bytes` bytes and
  `max_headers` headers (431, then closed);
- an idle keep-alive connection is closed after `keep_alive_timeout_s` (uvicorn's own);
- a request body that stops arriving for `body_idle_timeout_s` closes the connection;
- past `max_connections` open connections, new ones are closed at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    body_idle_timeout_s: float = 30.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_connections: int = 4096


def limited_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn (`http=`), bound to `limits`."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})


class LimitedHttpProtocol(HttpToolsProtocol):
    limits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._head_bytes, self._header_bytes, self._header_count, self._refusal = 0, 0, 0, ""
        self._in_head, self._in_body, self._responded = True, False, False
        if len(self.connections) > self.limits.max_connections:
            log.warning("more than %d connections open: closing a new one",
                        self.limits.max_connections)
            transport.close()
            return
        self._arm(self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._in_body and self.flow.read_paused:  # we stopped reading, not the client
            self._arm(self.limits.body_idle_timeout_s)
            return
        log.info("closing a connection: its request %s did not arrive in time",
                 "head" if self._in_head else "body")
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_body:
            self._arm(self.limits.body_idle_timeout_s)
        awaiting_head = self._in_head  # (a chunk that ends a body is not counted as a head)
        super().data_received(data)
        if awaiting_head and self._in_head and not self.transport.is_closing():  # incomplete
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refusal = f"request head over {self.limits.max_header_bytes} bytes"
                self.send_400_response(self._refusal)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._header_bytes, self._header_count = True, 0, 0, 0
        self._responded = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if self._header_count > self.limits.max_headers:
            self._refusal = f"more than {self.limits.max_headers} headers"
        elif self._header_bytes > self.limits.max_header_bytes:
            self._refusal = f"request head over {self.limits.max_header_bytes} bytes"
        if self._refusal:
            raise ValueError(self._refusal)  # httptools: HttpParserCallbackError -> refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head, self._in_body = False, True
        self._arm(self.limits.body_idle_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._disarm()
        super().on_message_complete()
        if self._responded:  # answered before its body had all arrived (a 413 on its length)
            self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._responded = True
        if not self._in_body:  # else the rest of the body comes first, then the next head
            self._await_head()

    def _await_head(self) -> None:
        if not self.transport.is_closing():
            self._in_head, self._head_bytes = True, 0
            self._arm(self.limits.header_timeout_s)  # the next head (idle: keep-alive first)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's refusal of a malformed request; ours (a head over the limits) is a 431."""
        if not self._refusal:
            return super().send_400_response(msg)
        body = self._refusal.encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"content-type: text/plain; charset=utf-8\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n"
                             b"connection: close\r\n\r\n" + body)
        self.transport.close()
