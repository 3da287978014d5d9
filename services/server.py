"""Assemble and run one model server: gRPC (OIP + control + health + reflection), metrics, signals."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import message_factory

from tensorfleet.core import wire
from tensorfleet.core.auth import SUBMIT, TokenAuth, TokenAuthInterceptor
from tensorfleet.core.exit_codes import EXIT_DEVICE_LOST
from tensorfleet.core.exposure import DEFAULT_HOST
from tensorfleet.core.grpc_server import GrpcServer, stop_on_signals
from tensorfleet.core.malformed import MalformedRequestInterceptor
from tensorfleet.core.settings import MAX_MESSAGE_BYTES, server_options
from tensorfleet.protos import inference_pb2, tensorfleet_pb2
from tensorfleet.protos import tensorfleet_pb2_grpc as tf_grpc

from .dataplane import DataPlane
from .device import check_device_available
from .frontends.control_servicer import ControlServicer
from .frontends.inference_servicer import InferenceServicer
from .frontends.interceptors import ErrorInterceptor
from .main_thread import MainThreadWorker
from .metrics import ServerMetrics
from .model_runtime import ModelRuntime
from .repository.repository import ModelRepository, ModelState
from .shared_memory import DEFAULT_MAX_BYTES, SWEEP_INTERVAL_S, SharedMemoryRegistry

if TYPE_CHECKING:
    from .frontends.http_app import HttpFrontEnd
    from .frontends.metrics_app import MetricsFrontEnd

log = logging.getLogger("tensorfleet.server")


INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
CONTROL_SERVICE = tensorfleet_pb2.DESCRIPTOR.services_by_name["ServerControl"].full_name

#: (request deserializer, response serializer) of the rpcs that carry tensors: their raw buffers
#: bypass protobuf (core/wire.py); every other rpc uses protobuf's own, as generated code does.
WIRE_CODECS: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] = {
    "ModelInfer": (wire.decode_request_or_error, wire.encode_response),
    "ModelStreamInfer": (wire.decode_request_or_error, wire.encode_stream_response),
}
_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def inference_handlers(servicer: InferenceServicer) -> dict[str, grpc.RpcMethodHandler]:
    """A handler for every rpc of GRPCInferenceService, from its descriptor: the tensor rpcs on
    the wire codec (WIRE_CODECS), the rest on their protobuf message classes."""
    service = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        deserializer, serializer = WIRE_CODECS.get(method.name, (request.FromString, response.SerializeToString))
        factory = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name), request_deserializer=deserializer, response_serializer=serializer
        )
    return handlers


def add_service(server: grpc.aio.Server, name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    """Register a service's handlers as the generated `add_*_to_server` functions do."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


@dataclass
class ServerOptions:
    model_repository: Path
    models: list[str] = field(default_factory=list)
    device: str = "cpu"
    host: str = DEFAULT_HOST
    port: int = 8001
    port_file: Path | None = None
    metrics_port: int | None = None
    http_port: int | None = None  # REST (OIP HTTP) beside gRPC, same host, auth and TLS
    http_port_file: Path | None = None
    #: Host names the HTTP faces accept besides loopback, IPs and --host (only checked with no token).
    http_allow_hosts: list[str] = field(default_factory=list)
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    drain_seconds: float = 30.0
    threads: int | None = None
    #: Listen beyond loopback with no token and no mutual TLS (logged, and shown by GetServerInfo).
    insecure: bool = False
    max_message_bytes: int = MAX_MESSAGE_BYTES
    #: Rpcs handled at once (streams count as one each); more get RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 1024
    #: Concurrent HTTP/2 streams one connection may open.
    max_streams_per_connection: int = 256
    #: Unanswered requests one ModelStreamInfer stream may hold; more get RESOURCE_EXHAUSTED each.
    max_stream_in_flight: int = 1024
    shared_memory_max_bytes: int = DEFAULT_MAX_BYTES  # 0: the system shared-memory extension is off
    #: Exit (status 2, the model's error in the log) instead of serving when a model fails to load
    #: at start-up: what a coordinator that started this server for one model wants (Triton's
    #: --exit-on-error); off by default, so one broken model does not take the others down.
    exit_on_load_error: bool = False
    #: A header that may carry the token instead of `authorization: Bearer` (e.g. x-api-key).
    api_key_header: str | None = None


class ModelLoadFailed(RuntimeError):
    """A model named for this server failed to load, and the server was told to exit on it."""


class ModelServer:
    """One process, one device, its models kept loaded across requests and jobs."""

    def __init__(self, options: ServerOptions, model_worker: Executor | None = None) -> None:
        """`model_worker`: where every model loads and runs (serve_process's main thread);
        by default each model gets a thread of its own."""
        self.options = options
        self.metrics = ServerMetrics()
        self.repository = ModelRepository(options.model_repository, options.device, options.models)
        self.runtime = ModelRuntime(self.repository, self.metrics, model_worker)
        self.runtime.on_device_lost = self._device_lost
        #: The process's exit status: 0, or EXIT_DEVICE_LOST once the device failed.
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.shared_memory = SharedMemoryRegistry(options.shared_memory_max_bytes, options.max_message_bytes)
        self.dataplane = DataPlane(self.runtime, self.shared_memory)
        self._stopping = asyncio.Event()
        self.port = 0
        self.http: HttpFrontEnd | None = None
        self.metrics_http: MetricsFrontEnd | None = None
        # innermost: a request that does not parse is INVALID_ARGUMENT (core/malformed.py), not UNKNOWN
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor(), MalformedRequestInterceptor()]
        if options.token:  # one role on a model server: the token may do everything
            interceptors.insert(0, TokenAuthInterceptor(TokenAuth({SUBMIT: options.token}, options.api_key_header)))
        self.listener = GrpcServer(
            what="model server", host=options.host, port=options.port, services=[INFERENCE_SERVICE, CONTROL_SERVICE],
            authenticated=bool(options.token), insecure=options.insecure,
            tls_cert=options.tls_cert, tls_key=options.tls_key, tls_ca=options.tls_ca,
            interceptors=interceptors, max_concurrent_rpcs=options.max_concurrent_rpcs,
            options=[*server_options(options.max_message_bytes),
                     ("grpc.max_concurrent_streams", options.max_streams_per_connection)],
        )
        self.credentials = self.listener.credentials
        self.health = self.listener.health
        self.grpc = self.listener.server
        inference = InferenceServicer(self.dataplane, max_stream_in_flight=options.max_stream_in_flight)
        add_service(self.grpc, INFERENCE_SERVICE, inference_handlers(inference))
        unprotected = options.insecure and not (options.token or self.listener.mutual_tls)
        control = ControlServicer(self.runtime, self.drain, insecure=bool(unprotected))
        tf_grpc.add_ServerControlServicer_to_server(control, self.grpc)
        self.listener.add_health_and_reflection()

    async def _set_health(self, serving: bool) -> None:
        # Health is open (no token), so it names no model: a model's readiness is ModelReady, behind the
        # token, as on Triton, whose grpc.health.v1 knows only the server (issue 28 #12).
        await self.listener.set_health(("", INFERENCE_SERVICE), serving)

    def drain(self) -> None:
        """Stop accepting work; in-flight requests finish; then the process exits."""
        if not self.runtime.draining:
            log.info("draining: %d requests in flight", self.runtime.in_flight())
            self.runtime.draining = True
            self._stopping.set()

    def _device_lost(self, error: BaseException) -> None:
        """From a model thread: the device failed, so every later batch would too. The server
        stops (health NOT_SERVING at once, in-flight requests answered UNAVAILABLE) and exits
        with EXIT_DEVICE_LOST, for its supervisor (a local fleet, Kubernetes, systemd) to start
        it afresh, while clients take its work elsewhere."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop_for_device, error)

    def _stop_for_device(self, error: BaseException) -> None:
        if self.exit_code:
            return
        self.exit_code = EXIT_DEVICE_LOST
        log.error("the device failed (%s: %s); stopping, exit %d, to be started afresh",
                  type(error).__name__, error, EXIT_DEVICE_LOST)
        asyncio.ensure_future(self._set_health(False))
        self.drain()

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        check_device_available(self.options.device)
        credentials = self.credentials
        self.port = self.listener.bind()
        await self._set_health(False)
        await self.grpc.start()  # live (ServerLive) while models load; health says NOT_SERVING
        if self.options.http_port is not None or self.options.metrics_port is not None:
            port_file = self.options.http_port_file if self.options.http_port is not None else None
            await self.listener.start_side_server(self._start_faces, port_file)
        log.info("listening on %s:%d (%s); loading models from %s", self.options.host, self.port,
                 "TLS" if credentials else "plaintext", self.options.model_repository)
        await self.runtime.load_all()
        failed = []
        for entry in self.repository.entries():
            if entry.state is ModelState.READY:
                self.runtime.served(entry.name).batcher.start()
            else:
                log.error("model %s is %s: %s", entry.name, entry.state.value, entry.reason)
                failed.append(f"model '{entry.name}' failed to load: {entry.reason}")
        if failed and self.options.exit_on_load_error:
            await self._stop_http()
            await self.grpc.stop(0)
            await self.runtime.close()
            raise ModelLoadFailed("; ".join(failed))
        await self._set_health(True)
        self.listener.write_port_file(self.options.port_file)
        log.info("SERVING on port %d with %d model(s) ready", self.port,
                 sum(e.state is ModelState.READY for e in self.repository.entries()))
        return self.port

    async def _start_http(self) -> int:
        from .frontends.http_app import (  # FastAPI and uvicorn load only when asked for
            HttpFrontEnd,
            build_app,
        )

        options = self.options
        auth = TokenAuth({SUBMIT: options.token}, options.api_key_header) if options.token else None  # as on gRPC
        app = build_app(self.dataplane, auth, self.metrics.registry, max_body_bytes=options.max_message_bytes)
        self.http = HttpFrontEnd(app, options.host, options.http_port or 0, tls_cert=options.tls_cert,
                                 tls_key=options.tls_key, tls_ca=options.tls_ca, shutdown_seconds=options.drain_seconds,
                                 browser_guard=not options.token, allow_hosts=options.http_allow_hosts)
        port = await self.http.start()
        log.info("REST (Open Inference Protocol HTTP) on %s:%d", options.host, port)
        return port

    async def _start_faces(self) -> int:
        """The HTTP faces asked for (REST, Prometheus metrics), after gRPC; if one fails, those
        started are stopped (and GrpcServer.start_side_server stops gRPC). The REST port (0: none)."""
        port = 0
        try:
            if self.options.http_port is not None:
                port = await self._start_http()
            if self.options.metrics_port is not None:
                await self._start_metrics()
        except BaseException:
            await self._stop_http()
            raise
        return port

    async def _start_metrics(self) -> None:
        from .frontends.metrics_app import (  # uvicorn only when asked for
            MetricsFrontEnd,
            build_metrics_app,
        )

        options = self.options
        auth = TokenAuth({SUBMIT: options.token}, options.api_key_header) if options.token else None
        self.metrics_http = MetricsFrontEnd(
            build_metrics_app(self.metrics.registry, auth), options.host, options.metrics_port or 0,
            tls_cert=options.tls_cert, tls_key=options.tls_key, tls_ca=options.tls_ca,
            shutdown_seconds=options.drain_seconds, browser_guard=not options.token,
            allow_hosts=options.http_allow_hosts,
        )
        port = await self.metrics_http.start()
        log.info("Prometheus metrics on port %d", port)  # same token and TLS as gRPC

    async def _stop_http(self) -> None:
        for front in (self.http, self.metrics_http):
            if front is not None:
                await front.stop()

    async def run_until_stopped(self, *, signals: bool = True) -> None:
        """Serve until drain() (SIGTERM/SIGINT when `signals`), then stop: in-flight requests
        finish, listeners close, batchers and model threads end. `signals=False` for a server
        in a thread of a process that goes on (tests/inprocess.py)."""
        if signals and isinstance(self.runtime.shared_worker, MainThreadWorker):
            self.runtime.shared_worker.stop_on_signals(self.drain)  # its thread, the main one, gets them
        elif signals:
            stop_on_signals(self.drain)
        sweeper = asyncio.ensure_future(self._sweep_shared_memory())
        await self._stopping.wait()
        sweeper.cancel()
        await self._set_health(False)
        # Waits for in-flight rpcs (streams included) up to the grace period.
        await self._wait_for_in_flight(self.options.drain_seconds)
        await self.grpc.stop(grace=self.options.drain_seconds)
        await self._stop_http()
        await self.runtime.close()
        self.shared_memory.close()
        log.info("stopped")

    async def _sweep_shared_memory(self) -> None:
        """Drop regions of clients that died, even when no other client registers or asks."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.shared_memory.sweep()

    async def _wait_for_in_flight(self, limit: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while self.runtime.in_flight() and loop.time() < deadline:
            await asyncio.sleep(0.02)


async def serve(options: ServerOptions, model_worker: Executor | None = None) -> int:
    """Serve until stopped; the exit status (EXIT_DEVICE_LOST when the device failed)."""
    server = ModelServer(options, model_worker)
    await server.start()
    await server.run_until_stopped()
    return server.exit_code


def serve_process(options: ServerOptions) -> int:
    """`serve` as a process's whole life (`tensorfleet serve`); the exit status.

    On the CPU the models load and run on this, the main, thread, and the event loop with gRPC
    on a second one: only the main thread's malloc arena keeps a batch's blocks over 64 MiB
    from one batch to the next (services/main_thread.py). On a GPU the activations live in
    device memory and each model keeps a thread of its own, so that several overlap."""
    if options.device != "cpu":
        return asyncio.run(serve(options))
    worker = MainThreadWorker()
    return worker.run_beside_loop(lambda: serve(options, worker))
