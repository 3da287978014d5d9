"""What the sync and async inference clients share: set-up, the readiness deadline, the ordered window.

Only the waiting differs between them (threads or asyncio), so each client keeps its own loop
and calls into these pieces for everything else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from tensorfleet.core import wire
from tensorfleet.core.errors import InternalError, TensorfleetError, error_for_code
from tensorfleet.protos import inference_pb2_grpc as pb_grpc

from .channel import ConnectionOptions
from .messages import StreamResult


class ClientBase:
    """One channel to one server with its stubs; subclasses pick the channel kind (sync or aio)."""

    def __init__(
        self,
        address: str,
        make_channel: Callable[[str, ConnectionOptions], Any],
        *,
        token: str | None = None,
        tls: bool = False,
        root_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        server_name: str | None = None,
        timeout: float | None = None,
        options: ConnectionOptions | None = None,
    ) -> None:
        self.address = address
        self._options = options or ConnectionOptions(
            token=token,
            tls=tls,
            root_cert=root_cert,
            client_cert=client_cert,
            client_key=client_key,
            server_name=server_name,
        )
        self._timeout = timeout
        self._channel = make_channel(address, self._options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        # The inference rpcs carry tensors: their buffers bypass protobuf (core/wire.py).
        self._infer, self._stream = wire.infer_methods(self._channel)


class ReadinessDeadline:
    """The bookkeeping of `wait_until_ready`: poll every `interval` until the deadline, then fail."""

    interval = 0.1

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.last_error: Exception | None = None
        self._deadline = time.monotonic() + timeout

    def pending(self) -> bool:
        return time.monotonic() < self._deadline

    def failure(self) -> TensorfleetError:
        return error_for_code(
            grpc.StatusCode.UNAVAILABLE,
            f"{self.address} not ready after {self.timeout}s: {self.last_error}",
        )


def check_window(window: int) -> None:
    if window < 1:
        raise ValueError("window must be at least 1")


class InOrder:
    """Stream replies arrive in any order; hand them on in request order (ids are indexes).

    A failed request is handed on as its typed error with `return_exceptions`; otherwise it is
    raised when its turn comes, after the results before it.
    """

    def __init__(self, return_exceptions: bool) -> None:
        self._return_exceptions = return_exceptions
        self._ready: dict[int, StreamResult] = {}
        self._next = 0

    def push(self, index: int, result: StreamResult) -> Iterator[StreamResult]:
        """Store one result; yield every result whose turn has now come."""
        self._ready[index] = result
        while self._next in self._ready:
            item = self._ready.pop(self._next)
            self._next += 1
            if isinstance(item, TensorfleetError) and not self._return_exceptions:
                raise item
            yield item

    def finish(self) -> None:
        """The stream ended: every request must have had its turn."""
        if self._ready:
            raise InternalError(f"stream ended with {len(self._ready)} responses out of order")
