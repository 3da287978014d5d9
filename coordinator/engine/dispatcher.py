"""Dispatch: every server pulls chunks and keeps a window of requests in flight on one stream.

- A slow server simply takes fewer chunks.
- A dead or stalled server loses its leases; those chunks go back to the queue, whole, and
  are recomputed from scratch elsewhere. A server that comes back is probed and used again.
- A request that fails for its rows (not for its server) is split in two and resent, down
  to single rows; those become row errors. Bisection is deterministic, so is the output.
- When no chunk is left to lease, a server with room in its window takes a request still
  waiting in another server's chunk, so the job's tail is not one server finishing its last
  chunk alone. Requests are the plan's, whoever computes them, so results do not change.
- A finished chunk is handed to `commit` (run in one writer thread) exactly once.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from tensorfleet.client import AsyncInferenceClient, ConnectionOptions
from tensorfleet.client.channel import aio_channel
from tensorfleet.client.inference_client import stream_error
from tensorfleet.client.messages import parse_infer_response
from tensorfleet.client.shared_memory import Lease, SharedMemorySession, same_host
from tensorfleet.core import wire
from tensorfleet.core.errors import DEVICE_FAILED, TensorfleetError, from_rpc_error
from tensorfleet.protos import inference_pb2_grpc as pb_grpc

from ..spec import PolicySpec
from .manifest import RowError
from .planner import Chunk
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


class ServerLost(Exception):
    """The stream to a server broke, or the server stalled."""


class ServerStalled(ServerLost):
    """A request went unanswered for policy.request_timeout_s: the server is alive but stuck."""


class DispatchFatal(Exception):
    """The job cannot go on (no server for too long, a row failed under on_row_error: fail)."""


@dataclass
class CompletedChunk:
    chunk: Chunk
    ids: np.ndarray
    ok: np.ndarray
    #: Model outputs for the ok rows only, in row order.
    outputs: dict[str, np.ndarray]
    errors: list[RowError]
    server: str


@dataclass
class Work:
    chunk: Chunk
    ids: np.ndarray | None = None
    pending: deque = field(default_factory=deque)
    inflight: int = 0
    results: dict[int, tuple[int, dict[str, np.ndarray]]] = field(default_factory=dict)
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)
    losses: int = 0
    handed_off: bool = False
    #: The server holding the lease (it commits the chunk), and the lease's generation:
    #: replies to requests sent before the chunk went back to the queue are ignored.
    owner: ServerState | None = None
    generation: int = 0
    #: Lost more than policy.retries times: its requests now go one at a time, alone on their
    #: server, and one in flight when its server dies is split in halves, down to the row that
    #: kills servers, which alone fails. Results survive its losses from then on.
    isolating: bool = False

    def reset(self) -> None:
        self.generation += 1
        self.pending = deque(self.chunk.requests())
        self.inflight = 0
        self.results.clear()
        self.errors.clear()

    @property
    def complete(self) -> bool:
        return not self.pending and self.inflight == 0

    def __lt__(self, other: Work) -> bool:
        return self.chunk.index < other.chunk.index


@dataclass
class ServerState:
    address: str
    alive: bool = False
    rows: int = 0
    requests: int = 0
    last_error: str = ""
    leases: list[Work] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def summary(self) -> dict[str, Any]:
        return {"address": self.address, "alive": self.alive, "rows": self.rows, "last_error": self.last_error}


def stack_rows(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate replies along rows; ragged outputs (replies of different widths) are zero-padded
    to the widest, and `output.ragged` lengths say which entries are real."""
    widest = tuple(max(sizes) for sizes in zip(*(a.shape[1:] for a in arrays), strict=True)) if arrays else ()
    if all(a.shape[1:] == widest for a in arrays):
        return np.concatenate(arrays)
    padded = []
    for array in arrays:
        pad = [(0, 0)] + [(0, want - have) for want, have in zip(widest, array.shape[1:], strict=True)]
        padded.append(np.pad(array, pad))
    return np.concatenate(padded)


class Dispatcher:
    def __init__(
        self,
        *,
        servers: list[str],
        source: RequestSource,
        chunks: list[Chunk],
        commit: Callable[[CompletedChunk], None],
        policy: PolicySpec,
        options: ConnectionOptions | None = None,
        on_lease: Callable[[int, str, float], None] | None = None,
        on_commit: Callable[[CompletedChunk], None] | None = None,
        verified: Mapping[str, float] | None = None,
        on_stall: Callable[[str], None] | None = None,
    ) -> None:
        """`verified`: address -> time.monotonic() when the fleet check found it serving the
        model; a server checked that recently opens its first stream without probing again.
        `on_stall(address)`: a server stalled (a local fleet kills it, to start it afresh)."""
        self.source = source
        self.policy = policy
        self.options = options or ConnectionOptions()
        self.servers = [ServerState(address) for address in servers]
        self._commit = commit
        self._on_lease = on_lease
        self._on_commit = on_commit
        self._queue: list[Work] = []
        for chunk in chunks:
            work = Work(chunk)
            work.reset()
            self._queue.append(work)
        heapq.heapify(self._queue)
        self._remaining = len(chunks)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="tf-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tf-write")
        self._commit_slots: asyncio.Semaphore | None = None
        self._finished: asyncio.Event | None = None
        self._fatal: BaseException | None = None
        self._commits: set[asyncio.Future] = set()
        self._workers: list[asyncio.Task] = []
        self._verified = dict(verified or {})
        self._on_stall = on_stall
        self._sessions: dict[str, SharedMemorySession] = {}

    # --- public ----------------------------------------------------------------------
    @property
    def alive(self) -> int:
        return sum(server.alive for server in self.servers)

    async def run(self) -> None:
        """Until every chunk is committed; DispatchFatal when the job cannot finish."""
        self._finished = asyncio.Event()
        # Chunks leased or awaiting commit: this bounds the coordinator's memory.
        self._commit_slots = asyncio.Semaphore(len(self.servers) * (self.policy.window + 2))
        if self._remaining == 0:
            return
        self._workers = [self._worker(server) for server in self.servers]
        watchdog = asyncio.create_task(self._watch_fleet())
        try:
            await self._finished.wait()
        finally:
            for task in [*self._workers, watchdog]:
                task.cancel()
            await asyncio.gather(*self._workers, watchdog, return_exceptions=True)
            if self._commits:
                await asyncio.gather(*self._commits, return_exceptions=True)
            self._reader.shutdown(wait=True)
            self._writer.shutdown(wait=True)
        if self._fatal is not None:
            raise self._fatal

    def add_server(self, address: str) -> None:
        """A server that joined mid-job (fleet discovery): it gets a worker and pulls chunks too."""
        if any(server.address == address for server in self.servers):
            return
        server = ServerState(address)
        self.servers.append(server)
        if self._finished is None or self._finished.is_set():
            return  # run() starts a worker for every server it finds
        for _ in range(self.policy.window + 2):  # its share of chunks in flight
            self._commit_slots.release()
        self._workers.append(self._worker(server))
        log.info("server %s joined the fleet", address)

    def _worker(self, server: ServerState) -> asyncio.Task:
        task = asyncio.create_task(self._serve(server))
        task.add_done_callback(self._worker_ended)
        return task

    def _worker_ended(self, task: asyncio.Task) -> None:
        """A worker killed by an error nobody handles (its input unreadable, a bug) fails the job
        at once: left alone, the chunks it held would wait forever for a worker that is gone."""
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())

    # --- fleet -------------------------------------------------------------------------
    def _fail(self, error: BaseException) -> None:
        if self._fatal is None:
            self._fatal = error
        self._finished.set()

    def _notify(self) -> None:
        for server in self.servers:
            server.wake.set()

    async def _watch_fleet(self) -> None:
        last_alive = time.monotonic()
        while not self._finished.is_set():
            if self.alive:
                last_alive = time.monotonic()
            elif time.monotonic() - last_alive > self.policy.server_wait_s:
                problems = "; ".join(f"{s.address}: {s.last_error or 'not reachable'}" for s in self.servers)
                self._fail(
                    DispatchFatal(
                        f"no server reachable for {self.policy.server_wait_s:.0f}s ({problems}). "
                        f"Start the servers or fix model.servers, then run again with --resume"
                    )
                )
                return
            await asyncio.sleep(0.2)

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

    def _return_leases(self, server: ServerState) -> None:
        for work in server.leases:
            if work.handed_off:
                continue
            if not work.isolating:
                work.losses += 1
                if work.losses > self.policy.retries:
                    log.warning(
                        "chunk %d was lost %d times with its server (last: %s); its requests now go one at "
                        "a time to find the row that kills servers", work.chunk.index, work.losses, server.last_error,
                    )
                    work.isolating = True
                work.reset()
            # isolating: what was in flight was split or failed when the stream ended (_isolate)
            heapq.heappush(self._queue, work)
            self._commit_slots.release()
        server.leases = []
        self._notify()

    def _isolate(self, server: ServerState, inflight: dict) -> None:
        """A stream ended with requests of isolating chunks unanswered: each was alone on the
        server, so it holds the row that killed it. Halve it; a single row fails."""
        for request_id, (work, start, stop, _, generation) in list(inflight.items()):
            if not work.isolating or generation != work.generation or work.handed_off or work.owner is not server:
                continue
            del inflight[request_id]
            work.inflight -= 1
            self._blame(server, work, start, stop)

    def _blame(self, server: ServerState, work: Work, start: int, stop: int) -> None:
        """An isolating chunk's request was alone on a server that died, stalled or lost its
        device under it: halve it, or fail its one row."""
        if stop - start > 1:
            middle = (start + stop) // 2
            work.pending.appendleft((middle, stop))
            work.pending.appendleft((start, middle))
            return
        self._row_failure(
            work, start, stop, "UNAVAILABLE",
            f"the server died with this row alone in flight, after chunk {work.chunk.index} was lost "
            f"{work.losses} times; the row crashes or hangs the model",
        )
        self._hand_off_if_complete(work, server)

    # --- one stream ------------------------------------------------------------------------
    async def _next_request(self, server: ServerState, busy: int) -> tuple[Work, int, int] | None:
        """The next request for this server's stream, which has `busy` requests in flight."""
        isolating = next((work for work in server.leases if work.isolating and not work.handed_off), None)
        if isolating is not None:  # alone in flight, or not at all
            if busy or not isolating.pending:
                return None
            start, stop = isolating.pending.popleft()
            isolating.inflight += 1
            return isolating, start, stop
        for work in server.leases:
            if work.pending:
                start, stop = work.pending.popleft()
                work.inflight += 1  # counted before any await, so the chunk cannot look complete
                return work, start, stop
        if not self._queue:
            return self._steal(server)
        if self._commit_slots.locked():
            return None
        await self._commit_slots.acquire()  # held until the chunk commits or goes back
        if not self._queue:
            self._commit_slots.release()
            return None
        work = heapq.heappop(self._queue)
        leased_at = time.time()
        work.owner = server
        server.leases.append(work)
        loop = asyncio.get_running_loop()
        if work.ids is None:
            work.ids = await loop.run_in_executor(self._reader, self.source.ids, work.chunk.start, work.chunk.stop)
        if self._on_lease is not None:
            noted = loop.run_in_executor(self._writer, self._on_lease, work.chunk.index, server.address, leased_at)
            # A lease note that fails (a full disk) is only a lost statistic; the commit reports it.
            noted.add_done_callback(lambda f: f.cancelled() or f.exception())
        if not work.pending or (work.isolating and busy):  # taken by others while the ids were read; or wait
            return None
        start, stop = work.pending.popleft()
        work.inflight += 1
        return work, start, stop

    def _steal(self, server: ServerState) -> tuple[Work, int, int] | None:
        """A request waiting in another server's leased chunk (the owner takes from the front)."""
        for other in self.servers:
            if other is server:
                continue
            for work in other.leases:
                if work.pending and work.ids is not None and not work.handed_off and not work.isolating:
                    start, stop = work.pending.pop()
                    work.inflight += 1
                    return work, start, stop
        return None

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
                        try:
                            request = await loop.run_in_executor(
                                self._reader, self.source.request, request_id, work.chunk.rows_at(start, stop),
                                (work.chunk.start, work.chunk.stop),
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
        for work, start, stop, _, generation in inflight.values():
            if work.owner is not server and generation == work.generation and not work.handed_off:
                work.inflight -= 1
                work.pending.appendleft((start, stop))
        inflight.clear()
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
                work.pending.appendleft((start, stop))
                await asyncio.sleep(0.05)
                return
            if error.code in SERVER_CODES:
                if work.isolating and DEVICE_FAILED in error.message:  # alone on it: it broke the device
                    self._blame(server, work, start, stop)
                else:
                    work.pending.appendleft((start, stop))
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

    def _hand_off_if_complete(self, work: Work, server: ServerState) -> None:
        if work.complete and not work.handed_off:
            owner = work.owner or server
            if work in owner.leases:
                owner.leases.remove(work)
            self._hand_off(work, owner)
            owner.wake.set()

    def _reject(self, server: ServerState, work: Work, start: int, stop: int, errors: dict[int, str]) -> None:
        """Rows the reader refused fail alone, unsent; the runs of good rows between them go back."""
        work.inflight -= 1
        runs: list[tuple[int, int]] = []
        run_start = start
        for position in range(start, stop):
            if position - start in errors:
                if run_start < position:
                    runs.append((run_start, position))
                run_start = position + 1
                self._row_failure(work, position, position + 1, "INVALID_ARGUMENT", errors[position - start])
        if run_start < stop:
            runs.append((run_start, stop))
        for run in reversed(runs):
            work.pending.appendleft(run)
        self._hand_off_if_complete(work, server)

    def _row_failure(self, work: Work, start: int, stop: int, code: str, message: str) -> None:
        if stop - start > 1:
            middle = (start + stop) // 2
            work.pending.appendleft((middle, stop))
            work.pending.appendleft((start, middle))
            return
        if self.policy.on_row_error == "fail":
            row = work.chunk.row_of(start)
            where = self.source.describe_row(row, str(work.ids[row - work.chunk.start])) if work.ids is not None else f"row {row}"
            self._fail(DispatchFatal(f"{where} failed: {code}: {message} (policy.on_row_error is 'fail')"))
        work.errors[start] = (code, message)

    # --- hand-off to the writer thread ------------------------------------------------------
    def _hand_off(self, work: Work, server: ServerState) -> None:
        work.handed_off = True
        chunk = work.chunk
        ok = np.ones(chunk.rows, dtype=bool)
        failed = {chunk.row_of(position): error for position, error in work.errors.items()}
        for row in failed:
            ok[row - chunk.start] = False
        ranges = sorted(work.results.items())
        pieces = [outputs for _, (_, outputs) in ranges]
        names = sorted({name for piece in pieces for name in piece})
        outputs = {name: stack_rows([piece[name] for piece in pieces]) for name in names}
        if chunk.order and ranges:  # back from length order to input order
            positions = np.concatenate([np.arange(start, stop) for start, (stop, _) in ranges])
            into_input_order = np.argsort(chunk.offsets()[positions - chunk.start])
            outputs = {name: value[into_input_order] for name, value in outputs.items()}
        assert work.ids is not None
        errors = []
        for row, (code, message) in sorted(failed.items()):
            row_id = str(work.ids[row - chunk.start])
            errors.append(RowError(row, row_id, code, f"{self.source.describe_row(row, row_id)}: {message}"))
        done = CompletedChunk(chunk, work.ids, ok, outputs, errors, server.address)
        work.results.clear()
        self._reader.submit(self.source.release, chunk.start, chunk.stop)  # its rows are not read again
        future = asyncio.get_running_loop().run_in_executor(self._writer, self._commit, done)
        self._commits.add(future)
        future.add_done_callback(lambda f: self._committed(f, done))

    def _committed(self, future: asyncio.Future, done: CompletedChunk) -> None:
        self._commits.discard(future)
        self._commit_slots.release()
        error = None if future.cancelled() else future.exception()  # retrieved: no "never retrieved" log
        if self._finished.is_set() and self._fatal is not None:
            return
        if future.cancelled():
            return
        if error is not None:
            self._fail(error)
            return
        self._remaining -= 1
        if self._on_commit is not None:
            self._on_commit(done)
        if self._remaining == 0:
            self._finished.set()
            self._notify()
