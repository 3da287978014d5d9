"""The Open Inference Protocol's data plane, with no transport in it.

Each front end (gRPC in inference_servicer.py, REST in http_app.py) turns its wire format into
a request message with its tensors as buffers, calls the data plane, and turns the answer
(plain values, model configs, numpy arrays) back into its wire format. So both front ends
share one validation, one batcher per model and one set of metrics, and a REST request and a
gRPC request can land in the same batch.

Domain errors (core/errors.py) propagate; each front end maps them to its status codes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from tensorfleet.core import wire
from tensorfleet.core.errors import TensorfleetError, Unavailable
from tensorfleet.core.version import PROTOCOL_EXTENSION, PROTOCOL_VERSION, __version__
from tensorfleet.protos import inference_pb2 as pb

from .contexts import ContextStore, context_ids, decode_context
from .model_config import ModelConfig
from .model_runtime import ModelRuntime
from .repository.repository import ModelEntry, ModelState
from .shared_memory import SharedMemoryRegistry
from .statistics import ModelStats
from .validation import decode_request

SERVER_NAME = "tensorfleet"
EXTENSIONS = [
    "model_repository", "statistics", "model_configuration", "binary_tensor_data",
    "tensorfleet_exclusive_batch", "tensorfleet_context", "system_shared_memory",
    f"{PROTOCOL_EXTENSION}{PROTOCOL_VERSION}",
]

#: Our backend names -> the platform names Triton clients know.
_PLATFORMS = {
    "torchscript": "pytorch_libtorch",
    "torch_export": "pytorch_export",
    "tensorflow": "tensorflow_savedmodel",
    "tensorflow_graph": "tensorflow_graphdef",
}


def platform(config: ModelConfig) -> str:
    return _PLATFORMS.get(config.backend, config.backend)


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass(frozen=True)
class ModelDetails:
    """What the ModelConfig answer is built from: the config and where the model runs."""

    config: ModelConfig
    device: str
    checksum: str
    #: config.features, read from the model folder at load ([] when none is declared)
    features: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelStatistics:
    name: str
    config: ModelConfig | None
    stats: ModelStats


@dataclass
class InferResult:
    """A request's outputs, in the model's declared output order, with the config they follow."""

    config: ModelConfig
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


class DataPlane:
    """Health, metadata, config, statistics, repository and inference over one ModelRuntime."""

    def __init__(self, runtime: ModelRuntime, shared_memory: SharedMemoryRegistry | None = None) -> None:
        self.runtime = runtime
        #: System shared-memory regions of clients on this host (services/shared_memory.py).
        self.shared_memory = shared_memory or SharedMemoryRegistry()
        self.repository = runtime.repository
        self.contexts = ContextStore(registry=getattr(runtime.metrics, "registry", None))

    # --- health and metadata -------------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        entries = self.repository.entries()
        return not self.runtime.draining and any(e.state is ModelState.READY for e in entries)

    def model_ready(self, name: str, version: str = "") -> bool:
        """False for a model not loaded, of another version, or while draining; NotFound if unknown."""
        entry = self.repository.entry(name)
        ready = entry.state is ModelState.READY and not self.runtime.draining
        if ready and version and entry.config is not None:
            ready = version == entry.config.version
        return ready

    def server_metadata(self) -> tuple[str, str, list[str]]:
        """(name, version, extensions)."""
        return SERVER_NAME, __version__, list(EXTENSIONS)

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        config = self._config(name, version)
        batch = [-1] if config.batched else []
        return ModelMetadata(
            name=config.name,
            versions=[config.version],
            platform=platform(config),
            inputs=[TensorMetadata(s.name, s.datatype, batch + list(s.shape)) for s in config.inputs],
            outputs=[TensorMetadata(s.name, s.datatype, batch + list(s.shape)) for s in config.outputs],
        )

    def model_details(self, name: str, version: str = "") -> ModelDetails:
        entry = self.repository.ready(name, version)
        assert entry.config is not None
        return ModelDetails(entry.config, self.repository.device, entry.checksum, entry.features)

    def statistics(self, name: str = "") -> list[ModelStatistics]:
        """One model's counters (NotFound / FailedPrecondition naming why), or every model's."""
        names = [name] if name else [e.name for e in self.repository.entries()]
        found = []
        for each in names:
            entry = self.repository.entry(each)
            if entry.config is None and name:
                self.repository.ready(each)  # raises with the reason
            found.append(ModelStatistics(each, entry.config, self.runtime.stats(each)))
        return found

    def repository_index(self, ready_only: bool = False) -> list[ModelEntry]:
        return [e for e in self.repository.entries() if not ready_only or e.state is ModelState.READY]

    async def load(self, name: str) -> None:
        await self.runtime.load(name)

    async def unload(self, name: str) -> None:
        await self.runtime.unload(name)

    def _config(self, name: str, version: str) -> ModelConfig:
        config = self.repository.ready(name, version).config
        assert config is not None
        return config

    # --- inference -------------------------------------------------------------------
    def refused(self, model: str, error: TensorfleetError) -> None:
        """Count a request its front end could not even decode, as infer counts its failures."""
        self.runtime.metrics.request_done(model or "(none)", error.code.name)

    async def infer(self, request: wire.InferRequest) -> InferResult:
        """Validate, batch, run: the whole path of one request, whatever carried it.

        `request.message` holds the names, shapes and parameters; `request.raw` the input
        buffers (views of the received bytes: decoded with np.frombuffer, never copied)."""
        message: pb.ModelInferRequest = request.message
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
                return InferResult(config)
            started = time.monotonic_ns()
            decoded = decode_request(message, config, self.shared_memory.inputs(message, request.raw))
            served.stats.record_stage("decode", time.monotonic_ns() - started)
            if use:
                decoded.context, decoded.context_inputs = use, self.contexts.get(config.name, use)
            outputs = await served.batcher.submit(decoded)
            code = None
            return InferResult(config, outputs)
        except TensorfleetError as error:
            code = error.code.name
            raise
        finally:
            self.runtime.metrics.request_done(name or "(none)", code)
