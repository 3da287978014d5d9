"""Data plane values <-> the Open Inference Protocol's protobuf messages.

The gRPC servicer uses all of it; the REST front end uses `model_config_message`, since
Triton's HTTP model config is the JSON mapping of this same protobuf message.
"""

from __future__ import annotations

import numpy as np

from tensorfleet.core import wire
from tensorfleet.core.codec import serialize_bytes
from tensorfleet.core.errors import TensorfleetError
from tensorfleet.core.sparse import PARAMETER_PREFIX as SPARSE_PARAMETER
from tensorfleet.protos import inference_pb2 as pb
from tensorfleet.protos import model_config_pb2 as mc

from ..dataplane import InferResult, ModelDetails, ModelMetadata, ModelStatistics, platform
from ..model_config import ModelConfig
from ..repository.repository import ModelEntry


def encode_response(request: pb.ModelInferRequest, result: InferResult) -> wire.InferResponse:
    """The reply's metadata as protobuf, its tensors as buffers: the arrays themselves are
    copied once, into the wire bytes, when grpc sends the reply (core/wire.py)."""
    config, outputs = result.config, result.outputs
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


def server_metadata_message(name: str, version: str, extensions: list[str]) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)


def model_metadata_message(metadata: ModelMetadata) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=metadata.name,
        versions=metadata.versions,
        platform=metadata.platform,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.outputs],
    )


def model_config_message(details: ModelDetails) -> mc.ModelConfig:
    """The subset of Triton's ModelConfig that clients read. Our own facts go in `parameters`:
    precision, version, artifact_sha256, token_budget; `max_length.<input>` for inputs that
    declare one; `sparse.<input>` = `csr` for inputs that take CSR rows; `features` (names joined by newlines) and `features_input` for a model
    that declares its feature list."""
    config, device = details.config, details.device
    message = mc.ModelConfig(
        name=config.name,
        platform=platform(config),
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
        "artifact_sha256": details.checksum,
        "token_budget": str(config.batching.token_budget),
    }
    extra.update({f"max_length.{spec.name}": str(spec.max_length) for spec in config.inputs if spec.max_length})
    extra.update({f"{SPARSE_PARAMETER}{spec.name}": spec.sparse for spec in config.inputs if spec.sparse})
    if config.features is not None and details.features:
        extra.update({"features": "\n".join(details.features), "features_input": config.features.input or ""})
    for key, value in extra.items():
        message.parameters[key].string_value = value
    return message


def _data_type(datatype: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def statistics_message(found: list[ModelStatistics]) -> pb.ModelStatisticsResponse:
    reply = pb.ModelStatisticsResponse()
    for each in found:
        _fill_statistics(reply.model_stats.add(), each.name, each.config, each.stats)
    return reply


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
        for stage, value in stats.stages.items():
            target.stage_stats[stage].count, target.stage_stats[stage].ns = value.count, value.ns
        for size in sorted(stats.by_batch_size):
            sized = stats.by_batch_size[size]
            batch = target.batch_stats.add(batch_size=size)
            for field in ("compute_input", "compute_infer", "compute_output"):
                value = getattr(sized, field)
                duration = getattr(batch, field)
                duration.count, duration.ns = value.count, value.ns


def repository_index_message(entries: list[ModelEntry]) -> pb.RepositoryIndexResponse:
    reply = pb.RepositoryIndexResponse()
    for entry in entries:
        version = entry.config.version if entry.config else ""
        reply.models.add(name=entry.name, version=version, state=entry.state.value, reason=entry.reason)
    return reply
