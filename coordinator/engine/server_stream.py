"""The per-server stream: probe a server, keep a window of requests in flight on one
ModelStreamInfer stream, and turn its replies into results, row failures or a lost server.

A mixin of the Dispatcher (dispatcher.py), which owns the state; leases and blame are in leases.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from tensorfleet.client import AsyncInferenceClient, ConnectionOptions
from tensorfleet.client.channel import aio_channel
from tensorfleet.client.inference_client import stream_error
from tensorfleet.client.messages import parse_infer_response
from tensorfleet.client.shared_memory import Lease, SharedMemorySession, same_host
from tensorfleet.core import wire
from tensorfleet.core.errors import DEVICE_FAILED, TensorfleetError, from_rpc_error
from tensorfleet.protos import inference_pb2_grpc as pb_grpc

from ..spec import PolicySpec
from .leases import ServerLost, ServerStalled, ServerState, Work
from .source import RequestSource, RowsRejected

log = logging.getLogger("tensorfleet.coordinator")

#: Codes that say something about the server, not the rows: the server loses its leases.
# a server the fleet check saw serving this recently skips its first probe (the plan ran in between)
VERIFIED_FOR_S = 30.0

SERVER_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.ABORTED,
    }
)


class ServerStreams:
    """The Dispatcher's per-server work (a mixin: the state is the Dispatcher's)."""

    policy: PolicySpec
    source: RequestSource
    options: ConnectionOptions
    servers: list[ServerState]
    _finished: asyncio.Event
    _verified: dict[str, float]
    _on_stall: Callable[[str], None] | None
    _sessions: dict[str, SharedMemorySession]
    _reader: Any

    if TYPE_CHECKING:
        def _notify(self) -> None: ...
        def _return_leases(self, server: ServerState) -> None: ...
        def _isolate(self, server: ServerState, inflight: dict) -> None: ...
        def _blame(self, server: ServerState, work: Work, start: int, stop: int) -> None: ...
        def _hand_off_if_complete(self, work: Work, server: ServerState) -> None: ...
        def _requeue(self, work: Work, start: int, stop: int) -> None: ...
        def _reject(self, server: ServerState, work: Work, start: int, stop: int, errors: dict[int, str]) -> None: ...
        def _row_failure(self, work: Work, start: int, stop: int, code: str, message: str) -> None: ...
        async def _next_request(self, server: ServerState, busy: int) -> tuple[Work, int, int] | None: ...

    async def _serve(self, server: ServerState) -> None:
        delay = 0.1
        client = AsyncInferenceClient(server.address, options=self.options, timeout=5.0, shared_memory=False)
        channel = aio_channel(server.address, self.options)
        try:
            while not self._finished.is_set():
                try:
                    if not self._just_verified(server.address):
                        await self._probe(client)
                except (ServerLost, TensorfleetError, grpc.RpcError, asyncio.TimeoutError, OSError) as error:
                    server.last_error = str(error)  # not serving yet (still loading) or unreachable: retry
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                delay = 0.1
                server.alive, server.last_error = True, ""
                log.info("server %s is serving", server.address)
                try:
                    await self._stream(server, channel)
                except (ServerLost, grpc.RpcError, TensorfleetError, asyncio.InvalidStateError) as error:
                    # InvalidStateError: the stream ended (connection reset) while a request was written
                    server.last_error = str(error) or type(error).__name__
                    log.warning("server %s lost: %s", server.address, server.last_error)
                    if isinstance(error, ServerStalled) and self._on_stall is not None:
                        self._on_stall(server.address)  # stuck on a batch: only a new process frees it
                finally:
                    server.alive = False
                    self._return_leases(server)
        finally:
            session = self._sessions.pop(server.address, None)
            if session is not None:
                await session.aclose()
            await client.close()
            await channel.close()

    def _just_verified(self, address: str) -> bool:
        """True once, for a server the fleet check saw serving within VERIFIED_FOR_S."""
        checked = self._verified.pop(address, None)
        return checked is not None and time.monotonic() - checked < VERIFIED_FOR_S

    async def _probe(self, client: AsyncInferenceClient) -> None:
        status = await client.health()
        if status != "SERVING":
            raise ServerLost(f"health is {status}")
        if not await client.is_model_ready(self.source.model, self.source.version):
            raise ServerLost(f"model '{self.source.model}' is not ready")

    async def _stream(self, server: ServerState, channel: grpc.aio.Channel) -> None:
        _, stream = wire.infer_methods(channel)  # tensor buffers bypass protobuf
        call = stream(metadata=self.options.metadata())
        inflight: dict[str, tuple[Work, int, int, float, int]] = {}
        loop = asyncio.get_running_loop()
        shm = self._shared_memory(server, channel)
        if shm is not None:
            shm.reset()  # a new stream may be to a restarted server: register the slots again
        leases: dict[str, Lease] = {}

        async def receive() -> None:
            async for reply in call:
                if leases:
                    reply = shm.claim(leases, reply)
                await self._on_reply(server, inflight, reply)
                server.wake.set()
            raise ServerLost("the server closed the stream")

        receiver = asyncio.create_task(receive())
        serial = 0
        try:
            for request in self.source.preamble():  # e.g. the job's prompt, once per stream
                await call.write(request)
            while True:
                server.wake.clear()
                if receiver.done():
                    receiver.result()
                if self._finished.is_set() and not inflight:
                    break
                if inflight:
                    oldest = min(entry[3] for entry in inflight.values())
                    if time.monotonic() - oldest > self.policy.request_timeout_s:
                        raise ServerStalled(f"no answer for {self.policy.request_timeout_s:.0f}s (stalled)")
                if len(inflight) < self.policy.window and not self._finished.is_set():
                    item = await self._next_request(server, len(inflight))
                    if item is not None:
                        work, start, stop = item
                        serial += 1
                        request_id = f"{work.chunk.index}:{start}:{stop}:{serial}"
                        rows, span = work.chunk.rows_at(start, stop), (work.chunk.start, work.chunk.stop)
                        try:
                            request = self.source.cached_request(request_id, rows, span)
                            if request is None:  # a read: on the reader thread, the loop keeps serving
                                request = await loop.run_in_executor(
                                    self._reader, self.source.request, request_id, rows, span
                                )
                        except RowsRejected as rejected:
                            self._reject(server, work, start, stop, rejected.errors)
                            continue
                        if shm is not None:
                            request, lease = await shm.asend(request, self.source.outputs or ())
                            if lease is not None:
                                leases[request_id] = lease
                        inflight[request_id] = (work, start, stop, time.monotonic(), work.generation)
                        server.requests += 1
                        await call.write(request)
                        continue
                waiter = asyncio.ensure_future(server.wake.wait())
                await asyncio.wait([waiter, receiver], timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
            await call.done_writing()
        finally:
            self._isolate(server, inflight)
            self._give_back_taken(server, inflight)
            receiver.cancel()
            call.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            if shm is not None:
                for lease in leases.values():
                    shm.abandon(lease)

    def _shared_memory(self, server: ServerState, channel: grpc.aio.Channel) -> SharedMemorySession | None:
        """One session per server on this host, kept across its streams (client/shared_memory.py)."""
        if not self.policy.shared_memory or not same_host(server.address):
            return None
        session = self._sessions.get(server.address)
        if session is None:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            metadata = self.options.metadata()

            async def rpc(method: str, request: object) -> object:
                try:
                    return await getattr(stub, method)(request, metadata=metadata, timeout=30.0)
                except grpc.RpcError as error:
                    raise from_rpc_error(error) from None

            session = self._sessions[server.address] = SharedMemorySession(rpc)
        return session

    def _give_back_taken(self, server: ServerState, inflight: dict) -> None:
        """Requests this stream took from other servers' chunks go back to those chunks."""
        given = False
        for work, start, stop, _, generation in inflight.values():
            if work.owner is not server and generation == work.generation and not work.handed_off:
                work.inflight -= 1
                self._requeue(work, start, stop)
                given = True
        inflight.clear()
        if given:  # not at every stream's end: waking 1,000 servers 1,000 times is the tail's cost again
            self._notify()

    async def _on_reply(self, server: ServerState, inflight: dict, reply: wire.StreamResponse) -> None:
        entry = inflight.pop(reply.response.message.id, None)
        if entry is None:
            if reply.error_message:
                raise ServerLost(f"stream error: {reply.error_message}")
            return
        work, start, stop, _, generation = entry
        if generation != work.generation or work.handed_off:
            return  # the chunk went back to the queue after this was sent
        work.inflight -= 1
        if reply.error_message:
            error = stream_error(reply.error_message)
            if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self._requeue(work, start, stop)
                await asyncio.sleep(0.05)
                return
            if error.code in SERVER_CODES:
                if work.isolating and DEVICE_FAILED in error.message:  # alone on it: it broke the device
                    self._blame(server, work, start, stop)
                else:
                    self._requeue(work, start, stop)
                raise ServerLost(reply.error_message)
            self._row_failure(work, start, stop, error.code.name, error.message)
        else:
            outputs = parse_infer_response(reply.response)
            bad = [name for name, value in outputs.items() if len(value) != stop - start]
            if bad:
                self._row_failure(work, start, stop, "INTERNAL", f"outputs {bad} do not have {stop - start} rows")
            else:
                work.results[start] = (stop, outputs)
                server.rows += stop - start
        self._hand_off_if_complete(work, server)
