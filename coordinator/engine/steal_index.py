"""Which request a server with room takes from another server's chunk once no chunk is left to lease.

The rule (dispatcher.py): the first leased chunk, in the order of the fleet's servers and then
of each server's leases, that has a request waiting, its ids read, and is neither handed off nor
isolating; the request taken is its last one (the owner takes from the front). Finding it by a
scan of every server's leases on each call made the job's tail cost servers x servers: with
1,000 servers each wakes several times a second and scanned all 1,000 (issue 26: `_steal` was
31 % of the coordinator's event loop at 1,000 simulated servers).

Here the candidates sit in a heap keyed by that same order, (the owner's place in the fleet,
the lease's serial number), so the chunk chosen is the same and a take costs O(log leases),
amortised. Entries are checked when they reach the top and dropped there when nothing is
waiting in their chunk; a chunk comes back when a request goes back into it (`refilled`).
A chunk handed off or gone back to the queue leaves at once (`dropped`), so the heap holds no
finished chunk's ids. A chunk that is not indexed is only not stolen from (its owner still
computes every request), so exactly-once never rests on this index being complete.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any, Protocol


class Work(Protocol):
    """What the index reads and changes of a lease (leases.Work; named here, not imported, so
    that leases.py may import this module)."""

    pending: deque
    inflight: int
    ids: Any
    handed_off: bool
    isolating: bool
    steal_key: tuple[int, int] | None

#: Keys of dropped chunks left in the heap are pruned once they outnumber live ones by this.
_SLACK = 64


class StealIndex:
    """Leased chunks other servers may take requests from, in the order the rule picks them."""

    def __init__(self) -> None:
        self._works: dict[tuple[int, int], Work] = {}  # key -> chunk, for the chunks indexed now
        self._keys: list[tuple[int, int]] = []  # a heap of keys; some may be dropped ones
        self._serial = 0

    def __len__(self) -> int:
        return len(self._works)

    def leased(self, work: Work, position: int) -> None:
        """`work` was leased, its ids read, by the server at `position` in the fleet (the last of
        that server's leases)."""
        self._serial += 1
        work.steal_key = (position, self._serial)
        if not work.isolating:  # an isolating chunk's requests go one at a time, on its owner
            self._add(work.steal_key, work)

    def refilled(self, work: Work) -> None:
        """A request went back into `work`'s pending: takeable again if it had been emptied."""
        key = work.steal_key
        if key is not None and key not in self._works and not work.handed_off and not work.isolating:
            self._add(key, work)

    def dropped(self, work: Work) -> None:
        """`work` was handed off or went back to the queue: no longer anyone's lease."""
        key, work.steal_key = work.steal_key, None
        if key is not None:
            self._works.pop(key, None)

    def take(self) -> tuple[Work, int, int] | None:
        """The last waiting request of the first takeable chunk, counted in flight; None if none."""
        keys, works = self._keys, self._works
        while keys:
            key = keys[0]
            work = works.get(key)
            if work is None:  # dropped: handed off or back in the queue
                heapq.heappop(keys)
                continue
            if not work.pending or work.isolating or work.handed_off or work.ids is None:
                heapq.heappop(keys)
                del works[key]
                continue
            start, stop = work.pending.pop()
            work.inflight += 1  # counted before any await, so the chunk cannot look complete
            return work, start, stop
        return None

    def _add(self, key: tuple[int, int], work: Work) -> None:
        self._works[key] = work
        heapq.heappush(self._keys, key)
        if len(self._keys) > 2 * len(self._works) + _SLACK:
            self._keys = sorted(self._works)  # a sorted list is a heap
