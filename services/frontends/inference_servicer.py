"""GRPCInferenceService: the Open Inference Protocol rpcs, a thin layer over the data plane.

Each rpc converts its message (grpc_converters.py), calls the data plane (dataplane.py) and
converts back. No per-method error handling: domain errors propagate to the error
interceptor, which maps them to status codes. Only the stream reports errors itself, per
request, as Triton does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from tensorfleet.core import wire
from tensorfleet.core.errors import (
    InternalError,
    InvalidArgument,
    ResourceExhausted,
    TensorfleetError,
)
from tensorfleet.protos import inference_pb2 as pb
from tensorfleet.protos import inference_pb2_grpc as pb_grpc

from ..dataplane import DataPlane
from ..shared_memory import status_response
from . import grpc_converters as convert

log = logging.getLogger("tensorfleet.inference")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, max_stream_in_flight: int = 1024) -> None:
        self.dataplane = dataplane
        #: Requests one ModelStreamInfer stream may have unanswered; more are refused one by one.
        self.max_stream_in_flight = max_stream_in_flight

    # --- health and metadata -----------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        return convert.server_metadata_message(*self.dataplane.server_metadata())

    async def ModelMetadata(self, request, context):
        return convert.model_metadata_message(self.dataplane.model_metadata(request.name, request.version))

    async def ModelConfig(self, request, context):
        details = self.dataplane.model_details(request.name, request.version)
        return pb.ModelConfigResponse(config=convert.model_config_message(details))

    async def ModelStatistics(self, request, context):
        return convert.statistics_message(self.dataplane.statistics(request.name))

    async def RepositoryIndex(self, request, context):
        return convert.repository_index_message(self.dataplane.repository_index(request.ready))

    async def RepositoryModelLoad(self, request, context):
        if request.parameters:  # Triton's 'config' and 'file:<path>' overrides would load sent content
            raise InvalidArgument(
                f"RepositoryModelLoad parameters {sorted(request.parameters)[:4]} are refused: this server loads "
                "models only from its own repository, never files or configs sent in a request"
            )
        if request.repository_name:
            raise InvalidArgument("RepositoryModelLoad: repository_name must be empty (one repository per server)")
        await self.dataplane.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self.dataplane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- system shared memory (services/shared_memory.py) ------------------------
    async def SystemSharedMemoryStatus(self, request, context):
        return status_response(self.dataplane.shared_memory.status(request.name, context.peer()))

    async def SystemSharedMemoryRegister(self, request, context):
        self.dataplane.shared_memory.register(
            request.name, request.key, request.offset, request.byte_size, context.peer()
        )
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request, context):
        self.dataplane.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # --- inference -------------------------------------------------------------
    async def infer(self, request: wire.InferRequest | pb.ModelInferRequest) -> wire.InferResponse:
        request = wire.InferRequest.of(request)
        result = await self.dataplane.infer(request)
        started = time.monotonic_ns()
        encoded = convert.encode_response(request.message, result)
        self.dataplane.runtime.stats(result.config.name).record_stage("encode", time.monotonic_ns() - started)
        self.dataplane.shared_memory.place_outputs(request.message, encoded)  # outputs asked for in shared memory
        return encoded

    async def ModelInfer(self, request, context):
        return await self.infer(request)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[wire.InferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wire.StreamResponse]:
        """Many requests in flight; each reply as soon as it is ready; errors per request."""
        # unbounded (the in-flight limit bounds it): put_nowait, no coroutine per reply
        replies: asyncio.Queue[wire.StreamResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def answer(request: wire.InferRequest) -> None:
            message = wire.InferRequest.of(request).message
            try:
                reply = wire.StreamResponse(response=await self.infer(request))
            except TensorfleetError as error:
                reply = convert.stream_error_reply(message, error)
            except Exception as error:  # a bug must not end the stream for everyone
                log.exception("stream request %s failed", message.id)
                reply = convert.stream_error_reply(message, InternalError(f"{type(error).__name__}: {error}"))
            replies.put_nowait(reply)

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    if len(tasks) >= self.max_stream_in_flight:
                        replies.put_nowait(convert.stream_error_reply(wire.InferRequest.of(request).message, ResourceExhausted(
                            f"{len(tasks)} requests already in flight on this stream, the most the server takes "
                            "(--max-stream-in-flight); wait for replies before sending more")))
                        continue
                    task = asyncio.ensure_future(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                replies.put_nowait(None)

        reader = asyncio.ensure_future(read_all())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
