"""GRPCInferenceService: the Open Inference Protocol rpcs, on top of the model runtime.

No per-method error handling: domain errors propagate to the error interceptor, which
maps them to status codes. Only the stream reports errors itself, per request, as Triton does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np

from tensorfleet.client import __version__, wire
from tensorfleet.client.codec import serialize_bytes
from tensorfleet.client.errors import (
    InternalError,
    InvalidArgument,
    ResourceExhausted,
    TensorfleetError,
    Unavailable,
)
from tensorfleet.protos import inference_pb2 as pb
from tensorfleet.protos import inference_pb2_grpc as pb_grpc
from tensorfleet.protos import model_config_pb2 as mc

from .contexts import ContextStore, context_ids, decode_context
from .model_config import ModelConfig
from .model_runtime import ModelRuntime
from .repository import ModelState
from .validation import decode_request

log = logging.getLogger("tensorfleet.inference")

SERVER_NAME = "tensorfleet"
EXTENSIONS = [
    "model_repository", "statistics", "model_configuration", "tensorfleet_exclusive_batch", "tensorfleet_context",
]


def encode_response(
    request: pb.ModelInferRequest, config: ModelConfig, outputs: dict[str, np.ndarray]
) -> wire.InferResponse:
    """The reply's metadata as protobuf, its tensors as buffers: the arrays themselves are
    copied once, into the wire bytes, when grpc sends the reply (client/wire.py)."""
    response = pb.ModelInferResponse(model_name=config.name, model_version=config.version, id=request.id)
    raw: list[wire.Buffer] = []
    for spec in config.outputs:
        if spec.name not in outputs:
            continue
        array = outputs[spec.name]
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(array.shape))
        raw.append(serialize_bytes(array) if spec.datatype == "BYTES" else np.ascontiguousarray(array))
    return wire.InferResponse(response, raw)


def stream_error_reply(request: pb.ModelInferRequest, error: TensorfleetError) -> wire.StreamResponse:
    """Triton's per-request stream error, with our status code name first and the id echoed."""
    return wire.StreamResponse(
        error_message=f"{error.code.name}: {error.message}",
        response=wire.InferResponse(
            pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
        ),
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime: ModelRuntime, max_stream_in_flight: int = 1024) -> None:
        self.runtime = runtime
        #: Requests one ModelStreamInfer stream may have unanswered; more are refused one by one.
        self.max_stream_in_flight = max_stream_in_flight
        self.repository = runtime.repository
        self.contexts = ContextStore(registry=getattr(runtime.metrics, "registry", None))

    # --- health and metadata -----------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        entries = self.repository.entries()
        ready = not self.runtime.draining and any(e.state is ModelState.READY for e in entries)
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request, context):
        entry = self.repository.entry(request.name)
        ready = entry.state is ModelState.READY and not self.runtime.draining
        if ready and request.version and entry.config is not None:
            ready = request.version == entry.config.version
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        config = self.repository.ready(request.name, request.version).config
        assert config is not None
        batch = [-1] if config.batched else []
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=config.name,
            versions=[config.version],
            platform=_platform(config),
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=batch + s.shape) for s in config.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=batch + s.shape) for s in config.outputs],
        )

    async def ModelConfig(self, request, context):
        entry = self.repository.ready(request.name, request.version)
        assert entry.config is not None
        return pb.ModelConfigResponse(config=model_config_message(entry.config, self.repository.device, entry.checksum))

    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else [e.name for e in self.repository.entries()]
        reply = pb.ModelStatisticsResponse()
        for name in names:
            entry = self.repository.entry(name)
            if entry.config is None and request.name:
                self.repository.ready(name)  # raises with the reason
            _fill_statistics(reply.model_stats.add(), name, entry.config, self.runtime.stats(name))
        return reply

    async def RepositoryIndex(self, request, context):
        reply = pb.RepositoryIndexResponse()
        for entry in self.repository.entries():
            if request.ready and entry.state is not ModelState.READY:
                continue
            version = entry.config.version if entry.config else ""
            reply.models.add(name=entry.name, version=version, state=entry.state.value, reason=entry.reason)
        return reply

    async def RepositoryModelLoad(self, request, context):
        if request.parameters:  # Triton's 'config' and 'file:<path>' overrides would load sent content
            raise InvalidArgument(
                f"RepositoryModelLoad parameters {sorted(request.parameters)[:4]} are refused: this server loads "
                "models only from its own repository, never files or configs sent in a request"
            )
        if request.repository_name:
            raise InvalidArgument("RepositoryModelLoad: repository_name must be empty (one repository per server)")
        await self.runtime.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self.runtime.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- inference -------------------------------------------------------------
    async def infer(self, request: wire.InferRequest | pb.ModelInferRequest) -> wire.InferResponse:
        """Validate, batch, run, encode: the whole path of one request."""
        request = wire.InferRequest.of(request)
        message = request.message
        name = message.model_name
        code: str | None = "UNKNOWN"
        try:
            if request.error is not None:
                raise request.error
            if self.runtime.draining:
                raise Unavailable("server is draining; send new requests elsewhere")
            served = self.runtime.served(name, message.model_version)
            config = served.entry.config
            assert config is not None
            put, use = context_ids(message)
            if put:  # store the prompt; answer with no outputs
                self.contexts.put(config.name, put, decode_context(message, config, request.raw))
                code = None
                return encode_response(message, config, {})
            decoded = decode_request(message, config, request.raw)
            if use:
                decoded.context, decoded.context_inputs = use, self.contexts.get(config.name, use)
            outputs = await served.batcher.submit(decoded)
            encoded = encode_response(message, config, outputs)
            code = None
            return encoded
        except TensorfleetError as error:
            code = error.code.name
            raise
        finally:
            self.runtime.metrics.request_done(name or "(none)", code)

    async def ModelInfer(self, request, context):
        return await self.infer(request)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[wire.InferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wire.StreamResponse]:
        """Many requests in flight; each reply as soon as it is ready; errors per request."""
        replies: asyncio.Queue[wire.StreamResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def answer(request: wire.InferRequest) -> None:
            message = wire.InferRequest.of(request).message
            try:
                reply = wire.StreamResponse(response=await self.infer(request))
            except TensorfleetError as error:
                reply = stream_error_reply(message, error)
            except Exception as error:  # a bug must not end the stream for everyone
                log.exception("stream request %s failed", message.id)
                reply = stream_error_reply(message, InternalError(f"{type(error).__name__}: {error}"))
            await replies.put(reply)

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    if len(tasks) >= self.max_stream_in_flight:
                        await replies.put(stream_error_reply(wire.InferRequest.of(request).message, ResourceExhausted(
                            f"{len(tasks)} requests already in flight on this stream, the most the server takes "
                            "(--max-stream-in-flight); wait for replies before sending more")))
                        continue
                    task = asyncio.ensure_future(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                await replies.put(None)

        reader = asyncio.ensure_future(read_all())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()


def _platform(config: ModelConfig) -> str:
    return {
        "torchscript": "pytorch_libtorch",
        "torch_export": "pytorch_export",
        "tensorflow": "tensorflow_savedmodel",
        "tensorflow_graph": "tensorflow_graphdef",
    }.get(
        config.backend, config.backend
    )


def model_config_message(config: ModelConfig, device: str, checksum: str = "") -> mc.ModelConfig:
    """The subset of Triton's ModelConfig that clients read."""
    message = mc.ModelConfig(
        name=config.name,
        platform=_platform(config),
        backend=config.backend,
        max_batch_size=config.max_batch_size,
    )
    for spec in config.inputs:
        message.input.add(
            name=spec.name,
            data_type=_data_type(spec.datatype),
            dims=spec.shape,
            allow_ragged_batch=spec.ragged,
            optional=spec.optional,
        )
    for spec in config.outputs:
        message.output.add(name=spec.name, data_type=_data_type(spec.datatype), dims=spec.shape)
    if config.batched:
        batching = message.dynamic_batching
        batching.preferred_batch_size.extend(config.batching.preferred_batch_sizes)
        batching.max_queue_delay_microseconds = int(config.batching.max_queue_delay_ms * 1000)
        batching.default_queue_policy.max_queue_size = config.batching.max_queue_size
    kind = mc.ModelInstanceGroup.KIND_GPU if device.startswith("cuda") else mc.ModelInstanceGroup.KIND_CPU
    group = message.instance_group.add(name=config.name, count=1, kind=kind)
    if device.startswith("cuda"):
        group.gpus.append(int(device.partition(":")[2] or 0))
    extra = {
        "precision": config.precision,
        "version": config.version,
        "artifact_sha256": checksum,
        "token_budget": str(config.batching.token_budget),
    }
    for key, value in extra.items():
        message.parameters[key].string_value = value
    return message


def _data_type(datatype: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def _fill_statistics(target: pb.ModelStatistics, name: str, config: ModelConfig | None, stats) -> None:
    target.name = name
    target.version = config.version if config else ""
    with stats.lock:
        target.last_inference = stats.last_inference_ms
        target.inference_count = stats.inference_count
        target.execution_count = stats.execution_count
        for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            value = getattr(stats, field)
            duration = getattr(target.inference_stats, field)
            duration.count, duration.ns = value.count, value.ns
        for size in sorted(stats.by_batch_size):
            sized = stats.by_batch_size[size]
            batch = target.batch_stats.add(batch_size=size)
            for field in ("compute_input", "compute_infer", "compute_output"):
                value = getattr(sized, field)
                duration = getattr(batch, field)
                duration.count, duration.ns = value.count, value.ns
