"""Views over a reader: the rows a model should see, without rewriting the input file.

- `Deduplicated`: repeated ids suffixed (ID-1, ID-2, as anndata's make_unique) or skipped.
- `Truncated`: a BYTES field cut to the model's max_length (a `truncated` field says which
  rows were), or over-length rows refused as row errors.
- `Aligned`: a matrix whose columns are named (h5ad var) reordered to the model's feature
  list: missing features filled with a stated value, extra ones dropped.

Each wraps one reader and changes only what it says; the rest passes through.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from .base import FieldInfo, Reader

_BLOCK = 65536


class View(Reader):
    """Passes everything through to `inner`; subclasses override what they change."""

    def __init__(self, inner: Reader) -> None:
        super().__init__(inner.spec)
        self.inner = inner
        self.default_field = inner.default_field

    @property
    def num_rows(self) -> int:
        return self.inner.num_rows

    def fields(self) -> dict[str, FieldInfo]:
        return self.inner.fields()

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        return self.inner.read(field, start, stop)

    def ids(self, start: int, stop: int) -> np.ndarray:
        return self.inner.ids(start, stop)

    def lengths(self, field: str, start: int, stop: int) -> np.ndarray:
        return self.inner.lengths(field, start, stop)

    def where(self, row: int) -> str:
        return self.inner.where(row)

    def row_errors(self, start: int, stop: int) -> dict[int, str]:
        return self.inner.row_errors(start, stop)

    @property
    def checks_rows(self) -> bool:
        return type(self).row_errors is not View.row_errors or self.inner.checks_rows

    def stored_fields(self) -> list[FieldInfo]:
        return self.inner.stored_fields()

    def close(self) -> None:
        self.inner.close()


def _id_hashes(reader: Reader) -> np.ndarray:
    hashes = np.empty(reader.num_rows, dtype=np.uint64)
    for start in range(0, reader.num_rows, _BLOCK):
        stop = min(start + _BLOCK, reader.num_rows)
        hashes[start:stop] = [
            int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little")
            for value in reader.ids(start, stop)
        ]
    return hashes


class Deduplicated(View):
    """input.duplicate_ids suffix | first. Memory: 8 bytes a row while opening, then the repeats
    (suffix) or 8 bytes a kept row (first, only when something was skipped)."""

    def __init__(self, inner: Reader, policy: str) -> None:
        super().__init__(inner)
        self.policy = policy
        hashes = _id_hashes(inner)
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        same = np.nonzero(ordered[1:] == ordered[:-1])[0]
        candidates = sorted({int(order[i]) for i in same} | {int(order[i + 1]) for i in same})
        seen: dict[str, int] = {}
        repeats: dict[int, str] = {}  # row -> its id, for every occurrence after the first
        for row in candidates:
            value = str(inner.ids(row, row + 1)[0])
            if value in seen:
                repeats[row] = value
            seen[value] = seen.get(value, 0) + 1
        self.repeated = len(repeats)
        self._renamed: dict[int, str] = {}
        self._keep: np.ndarray | None = None
        if policy == "suffix":
            counters: dict[str, int] = {}
            taken = set(ordered.tolist())
            for row, value in sorted(repeats.items()):
                while True:
                    counters[value] = counters.get(value, 0) + 1
                    name = f"{value}-{counters[value]}"
                    key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
                    if key not in taken:
                        taken.add(key)
                        break
                self._renamed[row] = name
        elif repeats:
            drop = np.fromiter(sorted(repeats), dtype=np.int64)
            self._keep = np.setdiff1d(np.arange(inner.num_rows, dtype=np.int64), drop)

    def describe(self) -> str:
        if not self.repeated:
            return ""
        done = "suffixed -1, -2, ..." if self.policy == "suffix" else "skipped (first kept)"
        return f"duplicate ids: {self.repeated} repeated ids {done}"

    def _rows(self, start: int, stop: int) -> np.ndarray | None:
        return None if self._keep is None else self._keep[start:stop]

    @property
    def num_rows(self) -> int:
        return self.inner.num_rows if self._keep is None else len(self._keep)

    def _gather(self, read, start: int, stop: int) -> np.ndarray:
        rows = self._rows(start, stop)
        return read(start, stop) if rows is None else gather_rows(read, rows)

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        return self._gather(lambda a, b: self.inner.read(field, a, b), start, stop)

    def lengths(self, field: str, start: int, stop: int) -> np.ndarray:
        return self._gather(lambda a, b: self.inner.lengths(field, a, b), start, stop)

    def ids(self, start: int, stop: int) -> np.ndarray:
        if self._keep is not None:
            return self._gather(self.inner.ids, start, stop)
        out = self.inner.ids(start, stop)
        for row, name in self._renamed.items():
            if start <= row < stop:
                out[row - start] = name
        return out

    def where(self, row: int) -> str:
        return self.inner.where(row if self._keep is None else int(self._keep[row]))

    def row_errors(self, start: int, stop: int) -> dict[int, str]:
        rows = self._rows(start, stop)
        if rows is None:
            return self.inner.row_errors(start, stop)
        if not len(rows):
            return {}
        inner = self.inner.row_errors(int(rows[0]), int(rows[-1]) + 1)
        return {start + int(i): inner[int(row)] for i, row in enumerate(rows) if int(row) in inner}


class Truncated(View):
    """A BYTES field against the model's max_length, by input.over_length (truncate | error)."""

    def __init__(self, inner: Reader, field: str, max_length: int, policy: str) -> None:
        super().__init__(inner)
        self.field, self.max_length, self.policy = field, max_length, policy
        self.over = 0
        for start in range(0, inner.num_rows, _BLOCK):
            stop = min(start + _BLOCK, inner.num_rows)
            self.over += int((inner.lengths(field, start, stop) > max_length).sum())

    def describe(self) -> str:
        if not self.over:
            return ""
        if self.policy == "truncate":
            return f"truncated: {self.over} rows longer than the model's max_length {self.max_length} (column 'truncated')"
        return f"over length: {self.over} rows longer than the model's max_length {self.max_length} failed"

    def fields(self) -> dict[str, FieldInfo]:
        out = dict(self.inner.fields())
        if self.policy == "truncate":
            out["truncated"] = FieldInfo("truncated", np.dtype(bool), ())
        return out

    def stored_fields(self) -> list[FieldInfo]:
        extra = [self.fields()["truncated"]] if self.policy == "truncate" else []
        return [*self.inner.stored_fields(), *extra]

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        if field == "truncated" and self.policy == "truncate":
            return self.inner.lengths(self.field, start, stop) > self.max_length
        values = self.inner.read(field, start, stop)
        if field == self.field:
            limit = self.max_length
            values = values.copy()
            values[:] = [item[:limit] if len(item) > limit else item for item in values]
        return values

    def lengths(self, field: str, start: int, stop: int) -> np.ndarray:
        found = self.inner.lengths(field, start, stop)
        return np.minimum(found, self.max_length) if field == self.field else found

    def row_errors(self, start: int, stop: int) -> dict[int, str]:
        errors = self.inner.row_errors(start, stop)
        if self.policy == "error":
            lengths = self.inner.lengths(self.field, start, stop)
            for offset in np.nonzero(lengths > self.max_length)[0]:
                errors.setdefault(
                    start + int(offset),
                    f"'{self.field}' is {int(lengths[offset])} long; the model takes at most {self.max_length} "
                    "(input.over_length: error)",
                )
        return errors


class Aligned(View):
    """`field`'s columns picked and ordered by `columns` (-1: missing, filled with `fill`)."""

    def __init__(self, inner: Reader, field: str, columns: np.ndarray, fill: float) -> None:
        super().__init__(inner)
        self.field, self.fill = field, fill
        self.columns = np.asarray(columns, dtype=np.int64)
        self._present = np.nonzero(self.columns >= 0)[0]

    def fields(self) -> dict[str, FieldInfo]:
        out = dict(self.inner.fields())
        info = out[self.field]
        out[self.field] = FieldInfo(info.name, info.dtype, (len(self.columns),))
        return out

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        values = self.inner.read(field, start, stop)
        if field != self.field:
            return values
        dtype = values.dtype if values.dtype.kind == "f" else np.dtype(np.float32)
        out = np.full((len(values), len(self.columns)), self.fill, dtype=dtype)
        out[:, self._present] = values[:, self.columns[self._present]]
        return out

    def lengths(self, field: str, start: int, stop: int) -> np.ndarray:
        if field == self.field:
            return np.full(stop - start, len(self.columns), dtype=np.int64)
        return self.inner.lengths(field, start, stop)


def gather_rows(read: Callable[[int, int], np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The given rows (ascending) of a span reader: one read from the first to the last, then picked."""
    if not len(rows):
        return read(0, 0)
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    return read(lo, hi)[rows - lo]
