"""The one assembly of a tensorfleet gRPC server (model server, coordinator service).

Both listeners are built the same way, so they differ only in their servicers: the exposure check
(core/exposure.py: no open port without a token or mutual TLS), TLS credentials, the interceptors
(auth first), health and reflection, the bind, the optional HTTP side server (REST or dashboard,
started after gRPC and stopped with it if it fails), the port files and the stop signals.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .exposure import check_exposure
from .process import write_port_file
from .tls import server_credentials

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class GrpcServer:
    """A grpc.aio server with health and reflection, checked and bound as every tensorfleet server is.

    `services`: the full names of the servicers added to `.server` (for reflection); health and
    reflection are added here. `authenticated`: a token guards the port (for the exposure check).
    """

    def __init__(
        self,
        *,
        what: str,
        host: str,
        port: int,
        services: Sequence[str],
        authenticated: bool,
        insecure: bool,
        tls_cert: Path | None,
        tls_key: Path | None,
        tls_ca: Path | None,
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        max_concurrent_rpcs: int,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        self.host = host
        self.requested_port = port
        self.mutual_tls = bool(tls_ca and tls_cert)
        check_exposure(host, token=authenticated, mutual_tls=self.mutual_tls, insecure=insecure, what=what)
        self.credentials = server_credentials(tls_cert, tls_key, tls_ca)
        self.server = grpc.aio.server(
            interceptors=list(interceptors), maximum_concurrent_rpcs=max_concurrent_rpcs, options=list(options)
        )
        self.health = HealthServicer()
        self._services = list(services)
        self.port = 0

    def add_health_and_reflection(self) -> None:
        """After the servicers: health, and reflection listing every service (grpcurl reads it)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*self._services, HEALTH_SERVICE, reflection.SERVICE_NAME], self.server)

    def bind(self) -> int:
        """Bind host:port (0: a free one), with TLS when credentials were given; the bound port."""
        address = f"{self.host}:{self.requested_port}"
        if self.credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, self.credentials)
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        return self.port

    async def set_health(self, services: Sequence[str], serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in services:
            await self.health.set(service, status)

    async def start_side_server(self, start: Callable[[], Awaitable[int]], port_file: Path | None) -> int:
        """Start the HTTP side server (after gRPC started); a failure stops gRPC too. Writes its port file."""
        try:
            port = await start()
        except BaseException:
            await self.server.stop(None)
            raise
        if port_file:
            write_port_file(port_file, port)
        return port

    def write_port_file(self, port_file: Path | None) -> None:
        """Once serving: the bound port, atomically, for whoever started the process (core/process.py)."""
        if port_file:
            write_port_file(port_file, self.port)


def stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT call `stop` on the running loop (an orderly drain, not an exception)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
