"""A view of some rows of a reader: the rows of one group of a table input (`sources[].group_by`).

Row r of the view is row `rows[r]` of the input, in input order; everything else passes through.
Reads of a span fetch the input rows from the first to the last one wanted, once, and pick.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import Reader
from .views import View, gather_rows


class RowSubset(View):
    def __init__(self, inner: Reader, rows: np.ndarray) -> None:
        super().__init__(inner)
        self.rows = np.asarray(rows, dtype=np.int64)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def _gather(self, read: Callable[[int, int], np.ndarray], start: int, stop: int) -> np.ndarray:
        return gather_rows(read, self.rows[start:stop])

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        return self._gather(lambda a, b: self.inner.read(field, a, b), start, stop)

    def lengths(self, field: str, start: int, stop: int) -> np.ndarray:
        return self._gather(lambda a, b: self.inner.lengths(field, a, b), start, stop)

    def ids(self, start: int, stop: int) -> np.ndarray:
        return self._gather(self.inner.ids, start, stop)

    def where(self, row: int) -> str:
        return self.inner.where(int(self.rows[row]))

    def row_errors(self, start: int, stop: int) -> dict[int, str]:
        rows = self.rows[start:stop]
        if not len(rows):
            return {}
        inner = self.inner.row_errors(int(rows[0]), int(rows[-1]) + 1)
        return {start + i: inner[int(row)] for i, row in enumerate(rows) if int(row) in inner}


def text_values(values: np.ndarray) -> list[str]:
    """A column's cells as text (bytes decoded, numbers as written)."""
    return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in values]


def group_rows(reader: Reader, column: str, block: int = 65536) -> dict[str, np.ndarray]:
    """value -> the rows holding it, values in order of first appearance."""
    found: dict[str, list[np.ndarray]] = {}
    for start in range(0, reader.num_rows, block):
        stop = min(start + block, reader.num_rows)
        values = np.array(text_values(reader.read(column, start, stop)), dtype=object)
        for value in dict.fromkeys(values.tolist()):
            found.setdefault(value, []).append(start + np.nonzero(values == value)[0])
    return {value: np.concatenate(parts) for value, parts in found.items()}
