"""Named points where a test or the chaos bench may have the coordinator kill itself (kill -9).

Off unless the environment asks: TENSORFLEET_CRASH_AT=NAME or NAME:N (the Nth time the point
is reached, from 1). Points: `part_renamed` (a part file is durable under its final name, its
manifest row not yet committed) and `merge` (the merge has written some chunks to its partial
output). Used by tests/coordinator/test_chaos_points.py and bench/chaos.py only.
"""

from __future__ import annotations

import os
import signal

ENV = "TENSORFLEET_CRASH_AT"
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process if TENSORFLEET_CRASH_AT names this point (and its count is reached)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
