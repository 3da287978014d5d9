"""Serve an ASGI app with uvicorn as a task of the running event loop (beside grpc.aio).

Used by the model server's REST face and the coordinator's dashboard; imported only when one
of them is asked for (it loads uvicorn). The process that owns the loop keeps SIGTERM and
SIGINT: uvicorn's own signal handlers are not installed. The socket is bound here first, so a
port in use is a ListenError naming the address, not uvicorn's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from .errors import Unavailable


class ListenError(Unavailable):
    """The address could not be bound (in use, not local, no permission)."""


class _Embedded(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
    ) -> None:
        config = uvicorn.Config(
            app, host=host, port=port, lifespan="off", access_log=False, log_level="warning", server_header=False,
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
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        try:
            sock = socket.create_server((config.host, config.port), family=family)
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
