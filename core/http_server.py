"""Serve an ASGI app with uvicorn as a task of the running event loop (beside grpc.aio).

Used by the model server's REST face and metrics port and the coordinator's dashboard; imported
only when one of them is asked for (it loads uvicorn). The process that owns the loop keeps
SIGTERM and SIGINT: uvicorn's own signal handlers are not installed. The socket is bound here
first, so a port in use is a ListenError naming the address, not uvicorn's exit.

Every connection goes through http_protocol.GuardedHttpProtocol (no-delay, coalesced writes,
header/body timeouts, a connection cap); a server with no token also through
http_origin.BrowserGuard (no foreign Host, no cross-origin state change). Limits from the
environment, read when a server is built:

    TENSORFLEET_HTTP_MAX_CONNECTIONS   open connections (default: a quarter of the fd limit, <= 1024)
    TENSORFLEET_HTTP_HEADER_TIMEOUT_S  seconds to send a request head (default 10)
    TENSORFLEET_HTTP_BODY_TIMEOUT_S    seconds a request body may pause (default 30)
    TENSORFLEET_HTTP_ALLOW_HOSTS       more Host names for a server with no token (comma-separated)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn

from .errors import Unavailable
from .http_origin import BrowserGuard, allowed_hosts_from_env
from .http_protocol import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, default_max_connections, protocol_class


class ListenError(Unavailable):
    """The address could not be bound (in use, not local, no permission)."""


class _Embedded(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _env_number(name: str, default: float | None, kind: type = float) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"${name} must be a positive number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"${name} must be a positive number, got {raw!r}")
    return value


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket made with protocol IPPROTO_TCP.

    asyncio turns on TCP_NODELAY only for sockets whose `proto` is IPPROTO_TCP, and an accepted
    socket inherits the listener's: `socket.create_server` makes protocol 0, so its connections
    kept Nagle on (issue 30). GuardedHttpProtocol sets the option as well."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


class EmbeddedHttpServer:
    """One uvicorn server on `host:port` (0 picks a free port), TLS and mutual TLS as on gRPC."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        what: str = "HTTP",
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_ca: Path | None = None,
        shutdown_seconds: float = 30.0,
        browser_guard: bool = False,
        allow_hosts: Sequence[str] = (),
    ) -> None:
        """`browser_guard`: refuse foreign Host names and cross-origin changes (for a server with no
        token); `allow_hosts`: more Host names it accepts, with $TENSORFLEET_HTTP_ALLOW_HOSTS's."""
        if browser_guard:
            app = BrowserGuard(app, host, [*allow_hosts, *allowed_hosts_from_env()])
        max_connections = int(_env_number("TENSORFLEET_HTTP_MAX_CONNECTIONS", None, int) or default_max_connections())
        protocol = protocol_class(
            max_connections=max_connections,
            header_timeout=_env_number("TENSORFLEET_HTTP_HEADER_TIMEOUT_S", HEADER_TIMEOUT_S),
            body_timeout=_env_number("TENSORFLEET_HTTP_BODY_TIMEOUT_S", BODY_TIMEOUT_S),
            what=what,
        )
        config = uvicorn.Config(
            app, host=host, http=protocol,
            # asyncio accepts up to `backlog` sockets per wake-up before any is refused and closed:
            # kept small, so a flood cannot take descriptors past the connection cap in one burst
            backlog=min(128, max_connections), port=port, lifespan="off", access_log=False, log_level="warning", server_header=False,
            ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None,
            ssl_ca_certs=str(tls_ca) if tls_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_ca else ssl.CERT_NONE,
            timeout_graceful_shutdown=max(1, int(shutdown_seconds)),
        )
        self.what = what
        self._server = _Embedded(config)
        self._task: asyncio.Task | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        config = self._server.config
        try:
            sock = listening_socket(config.host, config.port)
        except OSError as error:
            raise ListenError(
                f"cannot listen for {self.what} on {config.host}:{config.port}: {error.strerror or error}"
            ) from None
        self.port = sock.getsockname()[1]
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise ListenError(f"{self.what} on {config.host}:{self.port} stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        """Stop taking connections; requests in progress get up to shutdown_seconds."""
        if self._task is not None:
            self._server.should_exit = True
            await self._task
