"""uvicorn's HTTP/1.1 protocol with what a server facing untrusted sockets needs (issues 28, 30).

- `TCP_NODELAY` on every accepted connection. Without it a response that leaves in two writes
  (uvicorn writes the status line and headers, then the body) waits for the client's delayed
  ACK before its second write: 40-44 ms on every request of a sequential client.
- A response leaves in as few writes as possible: writes made in one turn of the event loop
  are handed to the socket together (one send; at once when they pass COALESCE_BYTES, then
  as one `sendmsg` on Python 3.12+, where a large body is not copied to join it).
- Header and body timeouts: a connection that has not sent a whole request head within
  `header_timeout` seconds (counted from the connection, or from the previous response), or
  that stops sending a body it declared for `body_timeout` seconds, gets 408 and is closed.
  uvicorn alone holds a socket that sent half a request forever.
- A connection cap: past `max_connections` open connections, a new one is answered 503 and
  closed at once, so sockets cannot use up the process's file descriptors (which gRPC needs too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import sys
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("tensorfleet.http")

#: Writes of one loop turn are held back (to leave together) until they reach this size.
COALESCE_BYTES = 256 * 1024
#: Python 3.12+ selector transports send a writelines() with one sendmsg, no join.
_ZERO_COPY_WRITELINES = sys.version_info >= (3, 12)
#: Seconds a client has to send a whole request head.
HEADER_TIMEOUT_S = 10.0
#: Seconds a request body may go without a byte arriving.
BODY_TIMEOUT_S = 30.0


def default_max_connections() -> int:
    """At most a quarter of the process's file descriptors (the rest for gRPC, models, files), ≤ 1024."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, soft // 4))


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class CoalescingTransport:
    """A transport whose writes of one loop turn go to the socket in one `writelines`.

    Everything but write/writelines/close/abort is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._scheduled = False
        #: Socket writes issued (a flush of held data counts one): what the tests look at.
        self.flushes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= COALESCE_BYTES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if self._transport.is_closing():
            return
        self.flushes += 1
        if len(pending) == 1:
            self._transport.write(pending[0])
        elif sum(map(len, pending)) < COALESCE_BYTES:
            self._transport.write(b"".join(pending))  # a small response: one send
        elif _ZERO_COPY_WRITELINES:
            self._transport.writelines(pending)  # one sendmsg of all the buffers
        else:
            for chunk in pending:  # a copy of a large body would cost more than a second send
                self._transport.write(chunk)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending, self._pending_bytes = [], 0
        self._transport.abort()


def _plain_response(status: bytes, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return b"".join([
        b"HTTP/1.1 ", status, b"\r\ncontent-type: application/json\r\ncontent-length: ",
        str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n", body,
    ])  # fmt: skip


class GuardedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with no-delay, coalesced writes, header/body timeouts and a connection cap.

    Subclassed per server by `protocol_class` with its limits as class attributes."""

    header_timeout: float = HEADER_TIMEOUT_S
    body_timeout: float = BODY_TIMEOUT_S
    max_connections: int = 1024
    what: str = "HTTP"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._waiting: str | None = None  # "head" or "body": the client owes us that
        self._head_started = False  # bytes of a request head arrived while waiting for one
        self._last_data = 0.0  # loop time of the last body bytes

    # --- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        set_nodelay(transport)
        if len(self.connections) >= self.max_connections:
            # Refused before it counts, its descriptor released at once.
            log.warning("%s: %d connections open (the limit); refusing one more", self.what, self.max_connections)
            transport.write(_plain_response(b"503 Service Unavailable",
                                            f"too many connections (the limit is {self.max_connections})"))
            transport.close()
            self.transport = None  # type: ignore[assignment]
            return
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        self._wait_for("head", self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:  # refused in connection_made
            return
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        if self._waiting == "body":
            self._last_data = self.loop.time()  # the body clock starts again (checked when the timer fires)
        elif self._waiting == "head":
            self._head_started = True
        super().data_received(data)

    # --- parser callbacks ------------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.more_body and self.parser is not None:
            self._wait_for("body", self.body_timeout)

    def on_message_complete(self) -> None:
        if self._waiting == "body":
            self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline and self.cycle is not None \
                and self.cycle.response_complete:
            self._wait_for("head", self.header_timeout)  # idle, or the next request's head

    # --- timers ---------------------------------------------------------------------------------
    def _wait_for(self, what: str, seconds: float) -> None:
        self._disarm()
        self._waiting = what
        self._head_started = False
        self._last_data = self.loop.time()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._waiting = None, None

    def _timed_out(self) -> None:
        what, self._timer = self._waiting, None
        if what is None or self.transport is None or self.transport.is_closing():
            return
        if what == "body":
            now = self.loop.time()
            if self.flow is not None and self.flow.read_paused:
                self._last_data = now  # we stopped reading, not the client
            remaining = self._last_data + self.body_timeout - now
            if remaining > 0:  # bytes came since the timer was set: wait the rest
                self._timer = self.loop.call_later(remaining, self._timed_out)
                return
        limit = self.header_timeout if what == "head" else self.body_timeout
        self._waiting = None
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's receive() sees a disconnect, not more body
            self.cycle.message_event.set()
        response_started = self.cycle is not None and self.cycle.response_started
        if not response_started and (what == "body" or self._head_started):  # an idle connection just closes
            self.transport.write(_plain_response(
                b"408 Request Timeout", f"request {'head' if what == 'head' else 'body'} not received within {limit:g} s"
            ))
        self.transport.close()


def protocol_class(*, max_connections: int | None = None, header_timeout: float = HEADER_TIMEOUT_S,
                   body_timeout: float = BODY_TIMEOUT_S, what: str = "HTTP") -> type[GuardedHttpProtocol]:
    """A GuardedHttpProtocol subclass carrying one server's limits (uvicorn builds one per connection)."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {
        "max_connections": max_connections or default_max_connections(),
        "header_timeout": header_timeout, "body_timeout": body_timeout, "what": what,
    })  # fmt: skip
