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
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tensorfleet.client import ConnectionOptions
from tensorfleet.client.shared_memory import SharedMemorySession

from ..spec import PolicySpec
from .leases import (
    CompletedChunk,
    DispatchFatal,
    LeaseBook,
    ServerLost,
    ServerStalled,
    ServerState,
    Work,
    stack_rows,
)
from .manifest import RowError
from .planner import Chunk
from .server_stream import VERIFIED_FOR_S, ServerStreams
from .source import RequestSource
from .steal_index import StealIndex

log = logging.getLogger("tensorfleet.coordinator")

__all__ = ["VERIFIED_FOR_S", "CompletedChunk", "DispatchFatal", "Dispatcher", "ServerLost", "ServerStalled",
           "ServerState", "Work", "stack_rows"]


class Dispatcher(LeaseBook, ServerStreams):
    """The scheduling loop: one worker per server pulls chunks from one queue (leases.py says what a
    lease holds and how failures are blamed; server_stream.py runs each server's stream); a
    finished chunk goes to `commit` in one writer thread."""

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
        self.servers = [ServerState(address, position) for position, address in enumerate(servers)]
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
        self._steals = StealIndex()  # leased chunks others may take requests from (the job's tail)
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
        server = ServerState(address, len(self.servers))
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

    # --- the next request: a leased chunk's, a new lease, or one taken from another server ---------
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
        self._steals.leased(work, server.position)  # after its ids: a taken request's rows need them
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
        """A request waiting in another server's leased chunk (the owner takes from the front):
        the first such chunk in the order of the servers, then of their leases (steal_index.py).
        `server`'s own leases have nothing waiting when it gets here, so none of them is taken."""
        return self._steals.take()

    # --- hand-off to the writer thread ------------------------------------------------------
    def _hand_off(self, work: Work, server: ServerState) -> None:
        work.handed_off = True
        self._steals.dropped(work)
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
