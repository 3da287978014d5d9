"""Stored request contexts: a prompt sent once per server and referenced by many requests.

In-context models (STACK: prompt cells + query cells) need the same large tensors with every
batch. A request with parameter `tensorfleet.context_put = "<id>"` carries only those
tensors (inputs the model declares `optional`, any number of rows); the server stores them
for that model under the id and answers with no outputs. A request with
`tensorfleet.context = "<id>"` carries only its own rows; the server adds the stored tensors
to its inputs before predict, and never merges it into a batch with requests of another
context. An id the server does not hold (never put, evicted, server restarted) is
FAILED_PRECONDITION naming it, so the client puts it again. Storage is a bounded LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from tensorfleet.core.codec import decode_contents, decode_raw
from tensorfleet.core.errors import FailedPrecondition, InvalidArgument
from tensorfleet.core.parameters import parameter_value
from tensorfleet.protos import inference_pb2 as pb

from .model_config import ModelConfig

PUT_PARAMETER = "tensorfleet.context_put"
USE_PARAMETER = "tensorfleet.context"
#: Defaults of the LRU: contexts per server, and their total bytes.
MAX_CONTEXTS = 16
MAX_BYTES = 2 << 30


def _string_parameter(request: pb.ModelInferRequest, key: str) -> str:
    if key not in request.parameters:
        return ""
    value = parameter_value(request.parameters[key])
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"parameter '{key}' must be a non-empty string, got {value!r}")
    return value


def context_ids(request: pb.ModelInferRequest) -> tuple[str, str]:
    """(id to store this request's tensors under, id of stored tensors to use); '' when unset."""
    put, use = _string_parameter(request, PUT_PARAMETER), _string_parameter(request, USE_PARAMETER)
    if put and use:
        raise InvalidArgument(f"a request sets '{PUT_PARAMETER}' or '{USE_PARAMETER}', not both")
    return put, use


def decode_context(
    request: pb.ModelInferRequest, config: ModelConfig, raw: Sequence[bytes | memoryview] | None = None
) -> dict[str, np.ndarray]:
    """The tensors of a context put: optional inputs of the model, any row count.

    `raw`: the raw input buffers when they travel beside the message (core/wire.py)."""
    raw = request.raw_input_contents if raw is None else raw
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument("context put: send one raw_input_contents buffer per input, or none")
    out: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        spec = config.input(tensor.name)
        if spec is None or not spec.optional:
            allowed = [s.name for s in config.inputs if s.optional]
            raise InvalidArgument(
                f"context put: '{tensor.name}' is not a context input of model '{config.name}' "
                f"(context inputs are its optional inputs: {allowed})"
            )
        if tensor.datatype != spec.datatype:
            raise InvalidArgument(f"context put: input '{tensor.name}' is {tensor.datatype}, the model expects {spec.datatype}")
        shape = list(tensor.shape)
        trailing = shape[1:] if config.batched else shape
        if len(trailing) != len(spec.shape) or any(w not in (-1, g) for w, g in zip(spec.shape, trailing, strict=True)):
            raise InvalidArgument(f"context put: input '{tensor.name}' has shape {shape}, rows of {spec.shape} expected")
        if raw:
            out[tensor.name] = decode_raw(tensor.name, spec.datatype, shape, raw[index])
        else:
            out[tensor.name] = decode_contents(tensor.name, spec.datatype, shape, tensor.contents)
    if not out:
        raise InvalidArgument("context put: the request carries no tensors")
    return out


class ContextStore:
    """(model, id) -> tensors, least recently used first out; counts puts for the metrics."""

    def __init__(self, max_contexts: int = MAX_CONTEXTS, max_bytes: int = MAX_BYTES, registry=None) -> None:
        self.max_contexts = max_contexts
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], dict[str, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self.puts = 0
        self._counter = None
        if registry is not None:
            from prometheus_client import Counter

            self._counter = Counter("tensorfleet_context_puts", "Contexts stored (prompt uploads)", ["model"], registry=registry)

    def put(self, model: str, context_id: str, tensors: dict[str, np.ndarray]) -> None:
        size = sum(array.nbytes for array in tensors.values())
        if size > self.max_bytes:
            raise InvalidArgument(f"context '{context_id}' is {size} bytes, over the server's {self.max_bytes}")
        self._drop((model, context_id))
        self._items[(model, context_id)] = tensors
        self._bytes += size
        while len(self._items) > self.max_contexts or self._bytes > self.max_bytes:
            self._drop(next(iter(self._items)))
        self.puts += 1
        if self._counter is not None:
            self._counter.labels(model).inc()

    def get(self, model: str, context_id: str) -> dict[str, np.ndarray]:
        tensors = self._items.get((model, context_id))
        if tensors is None:
            raise FailedPrecondition(
                f"context '{context_id}' is not stored on this server for model '{model}'; "
                f"send it again with parameter '{PUT_PARAMETER}'"
            )
        self._items.move_to_end((model, context_id))
        return tensors

    def _drop(self, key: tuple[str, str]) -> None:
        tensors = self._items.pop(key, None)
        if tensors is not None:
            self._bytes -= sum(array.nbytes for array in tensors.values())
