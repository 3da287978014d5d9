"""System shared memory on the server: the Open Inference Protocol extension Triton implements.

A client on the same host puts a tensor in a POSIX shared-memory object (/dev/shm/KEY),
registers a window of it under a name (SystemSharedMemoryRegister), and then sends only
`shared_memory_region` / `shared_memory_byte_size` / `shared_memory_offset` parameters
in place of the tensor's bytes; requested outputs with those parameters are written into
the region instead of into the reply. One memcpy each way instead of gRPC's framing,
HTTP/2 flow control and the copies on both sides of the socket.

Bounds and cleanup: keys are plain names under /dev/shm (no separator, no `..`, no
symlink followed); every registered byte counts against `max_bytes`; a region whose object
was unlinked, or whose tensorfleet client process is gone, is dropped at the next sweep
(each register and status call). Reads copy out of the region, so a client that rewrites or
unregisters a region while its request runs never changes a batch already formed.

Regions are read and written with pread/pwrite on the object's descriptor, never through a
mapping: a client may truncate its object at any moment, and touching a mapping past the new
end raises SIGBUS, which kills the whole server. pread returns short instead, pwrite cannot
fault, and the size is checked (fstat) on each use, so a truncated region gets a clean error.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import stat
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import Message

from tensorfleet.core import wire
from tensorfleet.core.codec import expected_byte_size
from tensorfleet.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from tensorfleet.core.parameters import parameter_value
from tensorfleet.core.shared_memory import (
    BYTE_SIZE_PARAMETER,
    FALLBACK_PARAMETER,
    OFFSET_PARAMETER,
    REGION_PARAMETER,
    UNKNOWN_REGION,
    owner_alive,
    owner_pid,
    shm_path,
)
from tensorfleet.protos import inference_pb2 as pb

log = logging.getLogger("tensorfleet.shared_memory")

#: How often a server looks for regions of clients that died (a few syscalls per region).
SWEEP_INTERVAL_S = 2.0

#: Registered bytes allowed in all, by default (--shared-memory-max-bytes on the server).
DEFAULT_MAX_BYTES = 4 << 30


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    #: Its key names a live SDK process that maps it (checked at register): swept when that process is gone.
    tracked: bool = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def check_size(self, tensor: str) -> None:
        """The object still holds the registered window (a client may have truncated it since)."""
        try:
            size = os.fstat(self.fd).st_size
        except OSError as error:
            raise FailedPrecondition(f"tensor '{tensor}': shared memory region '{self.name}': {error.strerror}") from None
        if size < self.offset + self.byte_size:
            raise FailedPrecondition(
                f"tensor '{tensor}': shared memory region '{self.name}' (key '{self.key}') was truncated to {size} "
                f"bytes after it was registered with {self.offset + self.byte_size}; register it again"
            )

    def read(self, tensor: str, start: int, size: int) -> bytes:
        """A copy of [start, start + size) of the object (pread: a truncated object reads short, no SIGBUS)."""
        self.check_size(tensor)
        data = os.pread(self.fd, size, start) if size else b""
        if len(data) != size:
            raise FailedPrecondition(
                f"tensor '{tensor}': shared memory region '{self.name}' (key '{self.key}') holds only "
                f"{max(len(data), 0) + start - self.offset} of its registered bytes (truncated?); register it again"
            )
        return data

    def write(self, tensor: str, start: int, data: memoryview) -> None:
        """Write `data` at `start` (pwrite: never faults, even on an object truncated meanwhile)."""
        self.check_size(tensor)
        written = 0
        while written < data.nbytes:
            written += os.pwrite(self.fd, data[written:], start + written)

    def unlinked(self) -> bool:
        try:
            return os.fstat(self.fd).st_nlink == 0
        except OSError:
            return True


class SharedMemoryRegistry:
    """The regions one server has mapped, by name."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_request_bytes: int | None = None) -> None:
        """`max_request_bytes`: the server's message limit (--max-message-mb), applied to a request's
        tensors in shared memory too: shared memory speeds a request up, it does not make it larger."""
        self.max_bytes = max_bytes
        self.max_request_bytes = max_request_bytes
        self._regions: dict[str, Region] = {}

    @property
    def registered_bytes(self) -> int:
        return sum(region.byte_size for region in self._regions.values())

    # --- the three rpcs ---------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int, peer: str = "local") -> None:
        """Map a window of /dev/shm/KEY. `peer` (grpc's "ipv4:HOST:PORT"): only a client on this host may."""
        if not self.max_bytes:
            raise FailedPrecondition("system shared memory is turned off on this server (--shared-memory-max-bytes 0)")
        if not _local_peer(peer):
            raise PermissionDenied(
                f"shared memory region '{name}': only a client on the server's host may register shared memory "
                f"(this one is {peer})"
            )
        self.sweep()
        if not name:
            raise InvalidArgument("shared memory region needs a name")
        if name in self._regions:
            raise AlreadyExists(f"shared memory region '{name}' is already registered; unregister it first")
        if byte_size <= 0:
            raise InvalidArgument(f"shared memory region '{name}': byte_size must be positive")
        path = shm_path(key, name)
        if self.registered_bytes + byte_size > self.max_bytes:
            raise ResourceExhausted(
                f"shared memory region '{name}': {byte_size} bytes would exceed this server's bound of "
                f"{self.max_bytes} registered bytes ({self.registered_bytes} in use); unregister regions first"
            )
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as error:
            raise InvalidArgument(f"shared memory region '{name}': cannot open key '{key}': {error.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgument(f"shared memory region '{name}': key '{key}' is not a shared-memory object")
            if offset + byte_size > info.st_size:
                raise InvalidArgument(
                    f"shared memory region '{name}': offset {offset} + byte_size {byte_size} is past the end of "
                    f"key '{key}' ({info.st_size} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        self._regions[name] = Region(name, key, offset, byte_size, fd, _mapped_by_owner(key, path))
        log.info("shared memory region %s registered: key %s, %d bytes from %d", name, key, byte_size, offset)

    def status(self, name: str = "", peer: str = "local") -> list[Region]:
        """Only to a client on this host: a region's name is all another needs to use it."""
        if not _local_peer(peer):
            raise PermissionDenied(f"only a client on the server's host may list shared memory (this one is {peer})")
        self.sweep()
        if not name:
            return list(self._regions.values())
        return [self._region(name)]

    def unregister(self, name: str = "") -> None:
        """One region, or all of them when `name` is empty; an unknown name is not an error (as Triton)."""
        names = [name] if name else list(self._regions)
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                region.close()

    def sweep(self) -> None:
        """Drop regions whose object was unlinked or whose tensorfleet client died."""
        for region in list(self._regions.values()):
            dead = region.tracked and not owner_alive(region.key)
            if dead or region.unlinked():
                self._regions.pop(region.name, None)
                region.close()
                if dead:  # its client can no longer remove it
                    with contextlib.suppress(OSError):
                        os.unlink(shm_path(region.key, region.name))

    # --- tensors ------------------------------------------------------------------------
    def _region(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise InvalidArgument(f"{UNKNOWN_REGION} '{name}'; register it first")
        return region

    def _window(self, tensor: str, parameters: object) -> tuple[Region, int, int]:
        """(region, absolute start, byte size) named by a tensor's parameters, checked."""
        name = parameter_value(parameters[REGION_PARAMETER])  # type: ignore[index]
        if not isinstance(name, str):
            raise InvalidArgument(f"tensor '{tensor}': {REGION_PARAMETER} must be a string")
        region = self._region(name)
        size = _int_parameter(parameters, BYTE_SIZE_PARAMETER, tensor, None)
        offset = _int_parameter(parameters, OFFSET_PARAMETER, tensor, 0)
        if offset < 0 or size < 0 or offset + size > region.byte_size:
            raise InvalidArgument(
                f"tensor '{tensor}': offset {offset} + byte_size {size} is outside shared memory region "
                f"'{name}' ({region.byte_size} bytes)"
            )
        return region, region.offset + offset, size

    def inputs(self, message: pb.ModelInferRequest, raw: Sequence[wire.Buffer]) -> Sequence[wire.Buffer | None]:
        """The raw buffers with each shared-memory input's bytes in its place (one per input).

        Without shared-memory inputs, `raw` as it came (the common path costs one scan)."""
        if not any(REGION_PARAMETER in tensor.parameters for tensor in message.inputs):
            return raw
        self._check_request_size(message, raw)
        sent = iter(raw)
        buffers: list[wire.Buffer | None] = []
        for tensor in message.inputs:
            if REGION_PARAMETER in tensor.parameters:
                region, start, size = self._window(tensor.name, tensor.parameters)
                expected = expected_byte_size(tensor.datatype, tensor.shape)
                if expected is not None and expected != size:
                    raise InvalidArgument(
                        f"input '{tensor.name}': {tensor.datatype} shape {list(tensor.shape)} needs {expected} bytes, "
                        f"shared memory region '{region.name}' window has {size}"
                    )
                buffers.append(region.read(tensor.name, start, size))  # a copy: the client may reuse it
            else:
                buffers.append(next(sent, None))
        if next(sent, None) is not None:
            raise InvalidArgument(
                f"request has more raw_input_contents than inputs outside shared memory ({len(raw)})"
            )
        return buffers

    def _check_request_size(self, message: pb.ModelInferRequest, raw: Sequence[wire.Buffer]) -> None:
        if self.max_request_bytes is None:
            return
        total = sum(len(memoryview(buffer).cast("B")) for buffer in raw)
        for tensor in message.inputs:
            if REGION_PARAMETER in tensor.parameters:
                total += _int_parameter(tensor.parameters, BYTE_SIZE_PARAMETER, tensor.name, 0)
        if total > self.max_request_bytes:
            raise ResourceExhausted(
                f"request tensors are {total} bytes with those in shared memory, over this server's "
                f"--max-message-mb limit of {self.max_request_bytes} bytes"
            )

    def place_outputs(self, message: pb.ModelInferRequest, response: wire.InferResponse) -> None:
        """Write each output requested into a region there; its reply buffer stays empty.

        An output larger than its window is an error, unless the request set
        `tensorfleet.shared_memory_fallback` (the SDK does): it then travels in the reply."""
        wanted = {out.name: out.parameters for out in message.outputs if REGION_PARAMETER in out.parameters}
        if not wanted:
            return
        fallback = FALLBACK_PARAMETER in message.parameters and parameter_value(
            message.parameters[FALLBACK_PARAMETER]) is True
        for index, tensor in enumerate(response.message.outputs):
            parameters = wanted.get(tensor.name)
            if parameters is None:
                continue
            region, start, size = self._window(tensor.name, parameters)
            data = memoryview(_contiguous(response.raw[index])).cast("B")
            if data.nbytes > size:
                if fallback:
                    continue
                raise InvalidArgument(
                    f"output '{tensor.name}': {data.nbytes} bytes do not fit its {size}-byte window of "
                    f"shared memory region '{region.name}'"
                )
            region.write(tensor.name, start, data)
            response.raw[index] = b""
            _copy_parameter(parameters, tensor.parameters, REGION_PARAMETER)
            _copy_parameter(parameters, tensor.parameters, OFFSET_PARAMETER)
            tensor.parameters[BYTE_SIZE_PARAMETER].int64_param = data.nbytes

    def close(self) -> None:
        self.unregister()


def status_response(regions: list[Region]) -> pb.SystemSharedMemoryStatusResponse:
    reply = pb.SystemSharedMemoryStatusResponse()
    for region in regions:
        entry = reply.regions[region.name]
        entry.name, entry.key, entry.offset, entry.byte_size = region.name, region.key, region.offset, region.byte_size
    return reply


def _mapped_by_owner(key: str, path: str) -> bool:
    """The key's PID is a process of this PID namespace that has the object mapped: only then may
    its death be read from the PID (a client in another namespace would look dead)."""
    pid = owner_pid(key)
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            return any(line.rstrip().endswith(path) for line in maps)
    except OSError:
        return False


def _local_peer(peer: str) -> bool:
    """grpc's peer string names a loopback address or a unix socket ("local" for in-process use)."""
    if peer == "local" or peer.startswith("unix:"):
        return True
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else ""
    host = urllib.parse.unquote(host).strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _int_parameter(parameters: object, key: str, tensor: str, default: int | None) -> int:
    if key not in parameters:  # type: ignore[operator]
        if default is None:
            raise InvalidArgument(f"tensor '{tensor}': {REGION_PARAMETER} needs {key}")
        return default
    value = parameter_value(parameters[key])  # type: ignore[index]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"tensor '{tensor}': {key} must be an integer, got {value!r}")
    return value


def _copy_parameter(source: object, target: object, key: str) -> None:
    if key in source:  # type: ignore[operator]
        value: Message = source[key]  # type: ignore[index]
        target[key].CopyFrom(value)  # type: ignore[index]


def _contiguous(buffer: wire.Buffer) -> wire.Buffer:
    return np.ascontiguousarray(buffer) if isinstance(buffer, np.ndarray) else buffer
