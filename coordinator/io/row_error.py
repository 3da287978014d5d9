"""A row that failed: written to the manifest by the dispatcher, and to the output by the writers.

Kept apart from the manifest so the writers (I/O) need nothing from the engine above them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowError:
    row: int
    id: str
    code: str
    message: str
