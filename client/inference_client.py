"""Synchronous inference client: one channel, typed errors, an ordered windowed stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from tensorfleet.core import wire
from tensorfleet.core.errors import TensorfleetError, from_rpc_error
from tensorfleet.protos import inference_pb2 as pb

from .base import ClientBase, InOrder, ReadinessDeadline, check_window
from .channel import ConnectionOptions, sync_channel
from .messages import (
    ParameterValue,
    StreamResult,
    build_wire_request,
    parse_infer_response,
    stream_error,
    stream_result,
)
from .shared_memory import Lease, SharedMemorySession, same_host
from .shared_stream import ThreadedSharedStream

__all__ = ["InferenceClient", "StreamResult", "stream_error"]


class InferenceClient(ClientBase):
    """Calls one server's GRPCInferenceService.

    >>> with InferenceClient("127.0.0.1:8001") as client:
    ...     out = client.infer("protein_embedder", {"sequence": ["MKTAYIAK"]})
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        server_name: str | None = None,
        timeout: float | None = None,
        options: ConnectionOptions | None = None,
        shared_stream: bool = False,
        shared_memory: bool | None = None,
    ) -> None:
        """`shared_stream`: send `infer` calls (from any number of threads) as messages on one
        open stream instead of one unary rpc each, about half the server's CPU per small call
        (client/shared_stream.py); a call's timeout is then kept by the client.

        `shared_memory`: pass large tensors through POSIX shared memory (client/shared_memory.py);
        by default on for a server on this host (a loopback address), False turns it off."""
        super().__init__(
            address, sync_channel, token=token, tls=tls, root_cert=root_cert,
            client_cert=client_cert, client_key=client_key, server_name=server_name,
            timeout=timeout, options=options,
        )
        self._shared = (
            ThreadedSharedStream(lambda requests: self._stream(requests, metadata=self._options.metadata()))
            if shared_stream
            else None
        )
        self._shm: SharedMemorySession | None = None
        if same_host(address) if shared_memory is None else shared_memory:
            self._shm = SharedMemorySession(self._rpc)

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
        if self._shm is not None:
            self._shm.close()
        self._channel.close()

    def _rpc(self, method: str, request: Any) -> Any:
        return self._call(getattr(self._stub, method), request)

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(
                request, metadata=self._options.metadata(), timeout=timeout or self._timeout
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # --- health and metadata -------------------------------------------------
    def is_live(self) -> bool:
        return self._call(self._stub.ServerLive, pb.ServerLiveRequest()).live

    def is_ready(self) -> bool:
        return self._call(self._stub.ServerReady, pb.ServerReadyRequest()).ready

    def is_model_ready(self, model: str, version: str = "") -> bool:
        return self._call(self._stub.ModelReady, pb.ModelReadyRequest(name=model, version=version)).ready

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status name: SERVING, NOT_SERVING, ..."""
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_ready(self, timeout: float = 60.0, model: str | None = None) -> None:
        """Block until health says SERVING (and `model` is ready), or raise Unavailable."""
        wait = ReadinessDeadline(self.address, timeout)
        while wait.pending():
            try:
                if self.health() == "SERVING" and (model is None or self.is_model_ready(model)):
                    return
            except TensorfleetError as error:
                wait.last_error = error
            time.sleep(wait.interval)
        raise wait.failure()

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return self._call(self._stub.ServerMetadata, pb.ServerMetadataRequest())

    def model_metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        return self._call(self._stub.ModelMetadata, pb.ModelMetadataRequest(name=model, version=version))

    def model_config(self, model: str, version: str = "") -> Any:
        return self._call(self._stub.ModelConfig, pb.ModelConfigRequest(name=model, version=version)).config

    def model_statistics(self, model: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        return self._call(
            self._stub.ModelStatistics, pb.ModelStatisticsRequest(name=model, version=version)
        )

    def repository_index(self, ready_only: bool = False) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        return list(self._call(self._stub.RepositoryIndex, pb.RepositoryIndexRequest(ready=ready_only)).models)

    def load_model(self, model: str) -> None:
        self._call(self._stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=model))

    def unload_model(self, model: str) -> None:
        self._call(self._stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=model))

    # --- inference -------------------------------------------------------------
    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        outputs: Iterable[str] | None = None,
        parameters: Mapping[str, ParameterValue] | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """One ModelInfer call; inputs are numpy arrays, torch tensors or lists of str/bytes."""
        output_names = list(outputs or ())
        request = build_wire_request(
            model, inputs, request_id=request_id, outputs=output_names, parameters=parameters
        )
        try:
            return self._send(request, output_names, timeout)
        except TensorfleetError as error:
            if self._shm is None or not self._shm.lost_regions(error):
                raise
        return self._send(request, output_names, timeout)  # once more, its regions registered again

    def _send(self, request: wire.InferRequest, outputs: list[str], timeout: float | None) -> dict[str, np.ndarray]:
        lease = None
        if self._shm is not None:
            request, lease = self._shm.send(request, outputs)
        try:
            if self._shared is not None:
                reply = self._shared.infer(request, timeout or self._timeout)
            else:
                reply = self._call(self._infer, request, timeout)
        except BaseException:
            if self._shm is not None:
                self._shm.abandon(lease)
            raise
        if self._shm is not None:
            reply = self._shm.receive(lease, reply)
        return parse_infer_response(reply)

    def stream(
        self,
        model: str,
        requests: Iterable[Mapping[str, Any]],
        *,
        window: int = 8,
        outputs: Iterable[str] | None = None,
        parameters: Mapping[str, ParameterValue] | None = None,
        return_exceptions: bool = False,
    ) -> Iterator[StreamResult]:
        """Keep `window` requests in flight on one ModelStreamInfer stream; yield in input order.

        With `return_exceptions`, a failed request yields its typed error in its place and
        the stream goes on; otherwise the first failure is raised.
        """
        check_window(window)
        output_names = list(outputs or ())
        slots = threading.Semaphore(window)
        closed = threading.Event()
        shm = self._shm
        leases: dict[str, Lease] = {}

        def produce() -> Iterator[wire.InferRequest]:
            for index, inputs in enumerate(requests):
                while not slots.acquire(timeout=0.5):
                    if closed.is_set():
                        return
                if closed.is_set():
                    return
                request = build_wire_request(
                    model, inputs, request_id=str(index), outputs=output_names, parameters=parameters
                )
                if shm is not None:
                    request, lease = shm.send(request, output_names)
                    if lease is not None:
                        leases[str(index)] = lease
                yield request

        call = self._stream(produce(), metadata=self._options.metadata())
        order = InOrder(return_exceptions)
        try:
            for reply in call:
                if shm is not None and leases:
                    reply = shm.claim(leases, reply)
                index, result = stream_result(reply)
                slots.release()
                yield from order.push(index, result)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            closed.set()
            call.cancel()
            if shm is not None:
                for lease in leases.values():
                    shm.abandon(lease)
        order.finish()
