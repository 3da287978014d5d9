"""Leases and blame: what a chunk's work holds, which server holds it, and what to do when rows fail.

A chunk leased to a server goes back to the queue, whole, when its server is lost; after
policy.retries losses it is isolated (its requests go one at a time) and a request alone on a
server that dies is halved down to the row that kills servers. A request that fails for its rows
is halved down to single rows, which become row errors. Used by the Dispatcher (dispatcher.py).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..spec import PolicySpec
from .manifest import RowError
from .planner import Chunk
from .source import RequestSource
from .steal_index import StealIndex

log = logging.getLogger("tensorfleet.coordinator")


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
    #: Its place among the chunks other servers take requests from while leased (steal_index.py).
    steal_key: tuple[int, int] | None = None

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
    #: Its place in the fleet's list (the order in which other servers' chunks are taken from).
    position: int = 0
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


class LeaseBook:
    """The Dispatcher's lease and blame rules (a mixin: the state is the Dispatcher's)."""

    policy: PolicySpec
    source: RequestSource
    _queue: list[Work]
    _commit_slots: asyncio.Semaphore
    _steals: StealIndex

    if TYPE_CHECKING:
        def _notify(self) -> None: ...
        def _fail(self, error: BaseException) -> None: ...
        def _hand_off(self, work: Work, server: ServerState) -> None: ...

    def _requeue(self, work: Work, start: int, stop: int) -> None:
        """Put a request back at the front of its chunk's pending (it is sent again); its owner
        is woken to send it, or another server takes it (steal_index.py)."""
        work.pending.appendleft((start, stop))
        self._steals.refilled(work)
        if work.owner is not None:
            work.owner.wake.set()

    def _return_leases(self, server: ServerState) -> None:
        if not server.leases:
            return  # nothing went back: no one to wake (every stream's end at a job's end)
        for work in server.leases:
            if work.handed_off:
                continue
            self._steals.dropped(work)
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
            self._requeue(work, middle, stop)
            self._requeue(work, start, middle)
            return
        self._row_failure(
            work, start, stop, "UNAVAILABLE",
            f"the server died with this row alone in flight, after chunk {work.chunk.index} was lost "
            f"{work.losses} times; the row crashes or hangs the model",
        )
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
            self._requeue(work, *run)
        self._hand_off_if_complete(work, server)

    def _row_failure(self, work: Work, start: int, stop: int, code: str, message: str) -> None:
        if stop - start > 1:
            middle = (start + stop) // 2
            self._requeue(work, middle, stop)
            self._requeue(work, start, middle)
            return
        if self.policy.on_row_error == "fail":
            row = work.chunk.row_of(start)
            where = self.source.describe_row(row, str(work.ids[row - work.chunk.start])) if work.ids is not None else f"row {row}"
            self._fail(DispatchFatal(f"{where} failed: {code}: {message} (policy.on_row_error is 'fail')"))
        work.errors[start] = (code, message)
