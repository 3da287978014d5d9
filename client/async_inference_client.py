"""asyncio inference client, the same surface as InferenceClient with `await`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from tensorfleet.core.errors import TensorfleetError, from_rpc_error
from tensorfleet.protos import inference_pb2 as pb

from . import wire
from .base import ClientBase, InOrder, ReadinessDeadline, check_window
from .channel import ConnectionOptions, aio_channel
from .messages import (
    ParameterValue,
    StreamResult,
    build_wire_request,
    parse_infer_response,
    stream_result,
)
from .shared_memory import Lease, SharedMemorySession, same_host
from .shared_stream import SharedStream


class AsyncInferenceClient(ClientBase):
    """Calls one server's GRPCInferenceService from asyncio code."""

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
        """`shared_stream`: send `infer` calls as messages on one open stream instead of one
        unary rpc each, about half the server's CPU per small call (client/shared_stream.py);
        a call's timeout is then kept by the client.

        `shared_memory`: pass large tensors through POSIX shared memory (client/shared_memory.py);
        by default on for a server on this host (a loopback address), False turns it off."""
        super().__init__(
            address, aio_channel, token=token, tls=tls, root_cert=root_cert,
            client_cert=client_cert, client_key=client_key, server_name=server_name,
            timeout=timeout, options=options,
        )
        self._shared = (
            SharedStream(lambda: self._stream(metadata=self._options.metadata())) if shared_stream else None
        )
        self._shm: SharedMemorySession | None = None
        if same_host(address) if shared_memory is None else shared_memory:
            self._shm = SharedMemorySession(self._rpc)

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._shared is not None:
            await self._shared.close()
        if self._shm is not None:
            await self._shm.aclose()
        await self._channel.close()

    async def _rpc(self, method: str, request: Any) -> Any:
        return await self._call(getattr(self._stub, method), request)

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(
                request, metadata=self._options.metadata(), timeout=timeout or self._timeout
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def is_live(self) -> bool:
        return (await self._call(self._stub.ServerLive, pb.ServerLiveRequest())).live

    async def is_ready(self) -> bool:
        return (await self._call(self._stub.ServerReady, pb.ServerReadyRequest())).ready

    async def is_model_ready(self, model: str, version: str = "") -> bool:
        reply = await self._call(self._stub.ModelReady, pb.ModelReadyRequest(name=model, version=version))
        return reply.ready

    async def health(self, service: str = "") -> str:
        reply = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def wait_until_ready(self, timeout: float = 60.0, model: str | None = None) -> None:
        wait = ReadinessDeadline(self.address, timeout)
        while wait.pending():
            try:
                if await self.health() == "SERVING" and (
                    model is None or await self.is_model_ready(model)
                ):
                    return
            except TensorfleetError as error:
                wait.last_error = error
            await asyncio.sleep(wait.interval)
        raise wait.failure()

    async def server_metadata(self) -> pb.ServerMetadataResponse:
        return await self._call(self._stub.ServerMetadata, pb.ServerMetadataRequest())

    async def model_metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        return await self._call(
            self._stub.ModelMetadata, pb.ModelMetadataRequest(name=model, version=version)
        )

    async def model_config(self, model: str, version: str = "") -> Any:
        reply = await self._call(self._stub.ModelConfig, pb.ModelConfigRequest(name=model, version=version))
        return reply.config

    async def model_statistics(self, model: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        return await self._call(
            self._stub.ModelStatistics, pb.ModelStatisticsRequest(name=model, version=version)
        )

    async def repository_index(self, ready_only: bool = False) -> list[Any]:
        reply = await self._call(self._stub.RepositoryIndex, pb.RepositoryIndexRequest(ready=ready_only))
        return list(reply.models)

    async def load_model(self, model: str) -> None:
        await self._call(self._stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=model))

    async def unload_model(self, model: str) -> None:
        await self._call(
            self._stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=model)
        )

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        outputs: Iterable[str] | None = None,
        parameters: Mapping[str, ParameterValue] | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        output_names = list(outputs or ())
        request = build_wire_request(
            model, inputs, request_id=request_id, outputs=output_names, parameters=parameters
        )
        try:
            return await self._send(request, output_names, timeout)
        except TensorfleetError as error:
            if self._shm is None or not self._shm.lost_regions(error):
                raise
        return await self._send(request, output_names, timeout)  # once more, its regions registered again

    async def _send(
        self, request: wire.InferRequest, outputs: list[str], timeout: float | None
    ) -> dict[str, np.ndarray]:
        lease = None
        if self._shm is not None:
            request, lease = await self._shm.asend(request, outputs)
        try:
            if self._shared is not None:
                reply = await self._shared.infer(request, timeout or self._timeout)
            else:
                reply = await self._call(self._infer, request, timeout)
        except BaseException:
            if self._shm is not None:
                self._shm.abandon(lease)
            raise
        if self._shm is not None:
            reply = self._shm.receive(lease, reply)
        return parse_infer_response(reply)

    async def stream(
        self,
        model: str,
        requests: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
        *,
        window: int = 8,
        outputs: Iterable[str] | None = None,
        parameters: Mapping[str, ParameterValue] | None = None,
        return_exceptions: bool = False,
    ) -> AsyncIterator[StreamResult]:
        """Keep `window` requests in flight on one stream; yield results in input order."""
        check_window(window)
        output_names = list(outputs or ())
        slots = asyncio.Semaphore(window)
        call = self._stream(metadata=self._options.metadata())
        shm = self._shm
        leases: dict[str, Lease] = {}

        async def write_all() -> None:
            index = 0
            async for inputs in _aiter(requests):
                await slots.acquire()
                request = build_wire_request(
                    model, inputs, request_id=str(index), outputs=output_names, parameters=parameters
                )
                if shm is not None:
                    request, lease = await shm.asend(request, output_names)
                    if lease is not None:
                        leases[str(index)] = lease
                await call.write(request)
                index += 1
            await call.done_writing()

        writer = asyncio.ensure_future(write_all())
        order = InOrder(return_exceptions)
        try:
            async for reply in call:
                if shm is not None and leases:
                    reply = shm.claim(leases, reply)
                index, result = stream_result(reply)
                slots.release()
                for item in order.push(index, result):
                    yield item
            await writer
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            if not writer.done():
                writer.cancel()
            call.cancel()
            if shm is not None:
                for lease in leases.values():
                    shm.abandon(lease)
        order.finish()


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if hasattr(items, "__aiter__"):
        async for item in items:  # type: ignore[union-attr]
            yield item
    else:
        for item in items:  # type: ignore[union-attr]
            yield item
