"""System shared memory on the client side: tensors handed to a server on the same host.

The SDK uses it by itself for a server on loopback (`shared_memory=False` turns it off):
a request whose inputs are large enough takes a slot, a POSIX shared-memory object
/dev/shm/tensorfleet-PID-N that this process creates, registers once with the server and
reuses; the inputs are copied into it and travel as `shared_memory_*` parameters, and each
output gets a window of the same slot. The server writes an output there, or, with the
`tensorfleet.shared_memory_fallback` parameter set, sends one that does not fit over the
wire as usual; the pool then sizes that output's windows to fit next time.

Cleanup: the objects are unlinked when the client closes, at exit, and by the next
tensorfleet client (or server sweep) on this host when their process died without it.
The same rules as Triton's for keys: a plain name in /dev/shm, never a path.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorfleet.core import wire
from tensorfleet.core.errors import InvalidArgument, TensorfleetError
from tensorfleet.core.exposure import is_loopback
from tensorfleet.core.shared_memory import (
    BYTE_SIZE_PARAMETER,
    FALLBACK_PARAMETER,
    KEY_PREFIX,
    OFFSET_PARAMETER,
    REGION_PARAMETER,
    UNKNOWN_REGION,
    remove_stale_objects,
    shm_path,
)
from tensorfleet.protos import inference_pb2 as pb

log = logging.getLogger("tensorfleet.client.shared_memory")

#: Requests with fewer input bytes than this go over gRPC as usual: nothing to gain.
DEFAULT_MIN_BYTES = 64 << 10
_ALIGN = 64


def same_host(address: str) -> bool:
    """A loopback or unix-socket address: the server can map our /dev/shm."""
    if address.startswith("unix:"):
        return True
    return is_loopback(address.rsplit(":", 1)[0] if ":" in address else address)


class Slot:
    """One shared-memory object of this process, registered with the server under its key."""

    def __init__(self, size: int) -> None:
        # unguessable: a region's name is all a client needs to read or write it
        self.name = f"{KEY_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.key = "/" + self.name
        self.size = size
        path = shm_path(self.key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self.memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.registered = False

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.memory.close()
        with contextlib.suppress(OSError):
            os.unlink(shm_path(self.key))


@dataclass
class Lease:
    """A slot for one request, and the rpcs to make before sending it."""

    slot: Slot
    model: str
    register: pb.SystemSharedMemoryRegisterRequest | None = None
    unregister: list[str] = field(default_factory=list)
    windows: dict[str, tuple[int, int]] = field(default_factory=dict)  # output -> (offset, size)


class SharedMemoryPool:
    """Slots for the requests in flight on one client; thread-safe."""

    def __init__(self, min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        self.min_bytes = min_bytes
        self._free: list[Slot] = []
        self._all: list[Slot] = []
        self._retired: list[str] = []  # registered names to unregister before the next register
        self._unsure: set[str] = set()  # registered before a reset: unregister, then register again
        self._output_bytes: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        remove_stale_objects()
        atexit.register(self.close)

    def prepare(
        self, request: wire.InferRequest, output_names: Sequence[str]
    ) -> tuple[wire.InferRequest, Lease] | None:
        """A copy of the request with its raw inputs in a slot and its outputs pointed at
        windows of it, and the slot's lease; `request` itself is left as it was.

        None when the inputs are small or some input is not raw."""
        message = request.message
        if not output_names or not request.raw or len(request.raw) != len(message.inputs):
            return None
        views = [memoryview(_contiguous(buffer)).cast("B") for buffer in request.raw]
        inputs = sum(_aligned(view.nbytes) for view in views)
        if inputs < self.min_bytes:
            return None
        model = message.model_name
        windows = {name: _aligned(max(self._output_bytes.get((model, name), 0), inputs, 4096))
                   for name in output_names}
        lease = self._acquire(inputs + sum(windows.values()), model)
        shared = pb.ModelInferRequest()
        shared.CopyFrom(message)
        offset = 0
        for tensor, view in zip(shared.inputs, views, strict=True):
            lease.slot.memory[offset : offset + view.nbytes] = view
            _point(tensor.parameters, lease.slot.name, offset, view.nbytes)
            offset += _aligned(view.nbytes)
        del shared.outputs[:]
        for name, size in windows.items():
            _point(shared.outputs.add(name=name).parameters, lease.slot.name, offset, size)
            lease.windows[name] = (offset, size)
            offset += size
        shared.parameters[FALLBACK_PARAMETER].bool_param = True
        return wire.InferRequest(shared, []), lease

    def finish(self, lease: Lease, response: wire.InferResponse) -> wire.InferResponse:
        """The response with every output read back out of the slot (copied); frees the slot."""
        try:
            raw = list(response.raw) or [b""] * len(response.message.outputs)
            for index, tensor in enumerate(response.message.outputs):
                window = lease.windows.get(tensor.name)
                if window is None:
                    continue
                if REGION_PARAMETER not in tensor.parameters:  # did not fit: it came over the wire
                    key = (lease.model, tensor.name)
                    self._output_bytes[key] = max(self._output_bytes.get(key, 0), len(memoryview(raw[index])))
                    continue
                size = tensor.parameters[BYTE_SIZE_PARAMETER].int64_param
                start = window[0]
                raw[index] = lease.slot.memory[start : start + min(size, window[1])]
            return wire.InferResponse(response.message, raw)
        finally:
            self.release(lease)

    def _acquire(self, size: int, model: str) -> Lease:
        with self._lock:
            fitting = [slot for slot in self._free if slot.size >= size]
            if fitting:
                slot = min(fitting, key=lambda s: s.size)
                self._free.remove(slot)
            else:
                if self._free:  # replace the largest free slot that is too small
                    old = max(self._free, key=lambda s: s.size)
                    self._free.remove(old)
                    self._all.remove(old)
                    if old.registered:
                        self._retired.append(old.name)
                    old.close()
                slot = Slot(1 << max(size - 1, 1).bit_length())
                self._all.append(slot)
            lease = Lease(slot, model)
            lease.unregister, self._retired = self._retired, []
            if not slot.registered:
                if slot.name in self._unsure:  # the server may or may not still hold it
                    self._unsure.discard(slot.name)
                    lease.unregister.append(slot.name)
                lease.register = pb.SystemSharedMemoryRegisterRequest(
                    name=slot.name, key=slot.key, offset=0, byte_size=slot.size
                )
                slot.registered = True
            return lease

    def reset(self) -> None:
        """The server may have lost our regions (it restarted, or a stream broke): register each
        slot again before its next use."""
        with self._lock:
            for slot in self._all:
                if slot.registered:
                    slot.registered = False
                    self._unsure.add(slot.name)

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.slot in self._all:
                self._free.append(lease.slot)

    def forget(self, lease: Lease) -> None:
        """The slot's registration failed: drop it (its object is unlinked)."""
        with self._lock:
            if lease.slot in self._all:
                self._all.remove(lease.slot)
            lease.slot.close()

    def close(self) -> list[str]:
        """Unlink every object; the names the server still has registered (to unregister)."""
        atexit.unregister(self.close)
        with self._lock:
            names = [slot.name for slot in self._all if slot.registered] + self._retired
            for slot in self._all:
                slot.close()
            self._all, self._free, self._retired = [], [], []
        return names


def _point(parameters: object, region: str, offset: int, size: int) -> None:
    parameters[REGION_PARAMETER].string_param = region  # type: ignore[index]
    parameters[OFFSET_PARAMETER].int64_param = offset  # type: ignore[index]
    parameters[BYTE_SIZE_PARAMETER].int64_param = size  # type: ignore[index]


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def _contiguous(buffer: wire.Buffer) -> wire.Buffer:
    return np.ascontiguousarray(buffer) if isinstance(buffer, np.ndarray) else buffer


class SharedMemorySession:
    """The pool of one client and the rpcs that go with it (sync: `send`/`close`; asyncio:
    `asend`/`aclose`, with `rpc` a coroutine function).

    `rpc(method_name, request)` calls a GRPCInferenceService method. Any failure to
    register (a server in another container, another /dev/shm, the server's bound) turns
    the session off for good: requests then travel over gRPC as before, never fail
    because of shared memory."""

    def __init__(self, rpc: Callable[[str, Any], Any], min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        self._rpc = rpc
        self.pool: SharedMemoryPool | None = SharedMemoryPool(min_bytes)
        self._outputs: dict[str, list[str]] = {}

    def send(self, request: wire.InferRequest, outputs: Sequence[str]) -> tuple[wire.InferRequest, Lease | None]:
        """The request to send (moved into shared memory when worth it) and its lease."""
        model = request.message.model_name
        if self.pool is None:
            return request, None
        try:
            if not outputs and model not in self._outputs:
                self._remember(model, self._rpc("ModelMetadata", pb.ModelMetadataRequest(name=model)))
        except TensorfleetError:  # the request itself will say why (unknown model, not ready...)
            return request, None
        prepared = self._prepare(request, outputs)
        if prepared is None:
            return request, None
        try:
            for method, message in _setup(prepared[1]):
                self._rpc(method, message)
        except TensorfleetError as error:
            self._turn_off(error)
            return request, None
        return prepared

    async def asend(
        self, request: wire.InferRequest, outputs: Sequence[str]
    ) -> tuple[wire.InferRequest, Lease | None]:
        model = request.message.model_name
        if self.pool is None:
            return request, None
        try:
            if not outputs and model not in self._outputs:
                self._remember(model, await self._rpc("ModelMetadata", pb.ModelMetadataRequest(name=model)))
        except TensorfleetError:
            return request, None
        prepared = self._prepare(request, outputs)
        if prepared is None:
            return request, None
        try:
            for method, message in _setup(prepared[1]):
                await self._rpc(method, message)
        except TensorfleetError as error:
            self._turn_off(error)
            return request, None
        return prepared

    def reset(self) -> None:
        """Register every slot again before its next use (a new stream, a restarted server)."""
        if self.pool is not None:
            self.pool.reset()

    def lost_regions(self, error: BaseException) -> bool:
        """The server no longer knows one of our regions (it restarted): reset, the caller retries once."""
        if self.pool is None or not isinstance(error, InvalidArgument) or UNKNOWN_REGION not in str(error):
            return False
        self.pool.reset()
        return True

    def receive(self, lease: Lease | None, response: wire.InferResponse) -> wire.InferResponse:
        if lease is None or self.pool is None:
            return response
        return self.pool.finish(lease, response)

    def claim(self, leases: dict[str, Lease], reply: wire.StreamResponse) -> wire.StreamResponse:
        """A stream reply with its outputs read out of its request's slot (by request id), the slot freed."""
        lease = leases.pop(reply.response.message.id, None)
        if lease is None:
            return reply
        if reply.error_message:
            self.abandon(lease)
            return reply
        return wire.StreamResponse(response=self.receive(lease, reply.response))

    def abandon(self, lease: Lease | None) -> None:
        if lease is not None and self.pool is not None:
            self.pool.release(lease)

    def close(self) -> None:
        for message in self._teardown():
            with contextlib.suppress(TensorfleetError):
                self._rpc("SystemSharedMemoryUnregister", message)

    async def aclose(self) -> None:
        for message in self._teardown():
            with contextlib.suppress(TensorfleetError):
                await self._rpc("SystemSharedMemoryUnregister", message)

    def _prepare(self, request: wire.InferRequest, outputs: Sequence[str]) -> tuple[wire.InferRequest, Lease] | None:
        assert self.pool is not None
        names = list(outputs or ()) or self._outputs.get(request.message.model_name, [])
        return self.pool.prepare(request, names)

    def _remember(self, model: str, metadata: pb.ModelMetadataResponse) -> None:
        self._outputs[model] = [output.name for output in metadata.outputs]

    def _turn_off(self, error: TensorfleetError) -> None:
        log.info("shared memory off for this client: %s", error)
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()

    def _teardown(self) -> list[pb.SystemSharedMemoryUnregisterRequest]:
        pool, self.pool = self.pool, None
        if pool is None:
            return []
        return [pb.SystemSharedMemoryUnregisterRequest(name=name) for name in pool.close()]


def _setup(lease: Lease) -> list[tuple[str, Any]]:
    """The rpcs to make before the lease's request: retire replaced slots, register a new one."""
    calls: list[tuple[str, Any]] = [
        ("SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest(name=name)) for name in lease.unregister
    ]
    if lease.register is not None:
        calls.append(("SystemSharedMemoryRegister", lease.register))
    return calls
