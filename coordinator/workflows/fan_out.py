"""Fan-out: a stage that emits several rows per input row, and the stages that run over them.

A fan-out stage (`fan_out: OUTPUT`) keeps, for each of its rows, a ragged output and its
count (one protein -> its 1-4 domains). The stages after it run over the children: child k of
row PARENT has id `PARENT:k`, and the children are ordered by parent, then k. A parent that
failed, or found nothing, has no children (its error stays in the fan-out stage's own table).

- ChildRows: the children's ids and their parents, known once the fan-out stage has finished
  (the next stage plans over them, so it waits for the whole stage, not one chunk).
- FanOutReader: the fan-out stage's outputs seen per child: the fanned outputs' k-th entry,
  every other output (one per parent) repeated for each of its children.
- Broadcast: any reader over an earlier row space (the job's input, a stage before the
  fan-out) seen per child, each child reading its parent's row.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from ..engine.manifest import Manifest, RowError
from ..io.readers import FieldInfo, InputError, Reader
from ..spec import InputSpec
from .stage_reader import StageAborted, StageReader


class ChildRows(Reader):
    """The rows of the stages after a fan-out: ids and each child's parent row (in the fan-out
    stage's own rows). Loads once, when first asked, after the fan-out stage has finished."""

    def __init__(self, spec: InputSpec, stage: StageReader, count: str, upstream_failed: Callable[[], bool],
                 parent_space: ChildRows | None = None, poll_s: float = 0.1) -> None:
        super().__init__(spec)
        self.stage = stage
        self.count = count
        self.parent_space = parent_space
        self._failed = upstream_failed
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._parents: np.ndarray | None = None
        self._k: np.ndarray | None = None

    def _finished(self) -> bool:
        manifest = Manifest.open_existing(self.stage.stage_dir)
        if manifest is None:
            return False
        try:
            counts = manifest.counts()
            return manifest.has_plan() and counts["chunks"] == counts["chunks_done"]
        finally:
            manifest.close()

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if self._parents is None:
                while not self._finished():
                    if self._failed():
                        raise StageAborted(f"the fan-out stage in {self.stage.stage_dir} stopped before finishing")
                    time.sleep(self._poll_s)
                rows = _planned_rows(self.stage.stage_dir)
                counts = np.zeros(rows, dtype=np.int64)
                for start in range(0, rows, 65536):
                    stop = min(start + 65536, rows)
                    ok = self.stage.ok(start, stop)
                    values = np.asarray(self.stage.read(self.count, start, stop)).reshape(stop - start, -1)[:, 0]
                    counts[start:stop] = np.where(ok, values.astype(np.int64), 0)
                if (counts < 0).any():
                    raise InputError(f"fan_out: '{self.count}' holds a negative count")
                self._parents = np.repeat(np.arange(rows, dtype=np.int64), counts)
                firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if rows else np.zeros(0, dtype=np.int64)
                self._k = np.arange(len(self._parents), dtype=np.int64) - np.repeat(firsts, counts)
            assert self._k is not None
            return self._parents, self._k

    @property
    def parents(self) -> np.ndarray:
        """Each child's parent row, in the fan-out stage's rows."""
        return self._load()[0]

    @property
    def k(self) -> np.ndarray:
        return self._load()[1]

    def to(self, space: ChildRows | None) -> np.ndarray:
        """Each child's row in an earlier row space (`space`: an enclosing ChildRows, or None: the input)."""
        rows, here = self.parents, self.parent_space
        while here is not space:
            if here is None:
                raise ValueError("not an enclosing row space")
            rows, here = here.parents[rows], here.parent_space
        return rows

    # --- Reader: ids and the row count, no fields ------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.parents)

    def fields(self) -> dict[str, FieldInfo]:
        return {}

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        raise InputError(f"{field}: the children's rows hold no fields of their own")

    def ids(self, start: int, stop: int) -> np.ndarray:
        parents, k = self.parents[start:stop], self.k[start:stop]
        if not len(parents):
            return np.zeros(0, dtype=object)
        first = int(parents[0])
        parent_ids = self.stage.ids(first, int(parents[-1]) + 1)
        return np.array([f"{parent_ids[p - first]}:{j}" for p, j in zip(parents, k, strict=True)], dtype=object)

    def where(self, row: int) -> str:
        return f"child {row} ({int(self.k[row])} of parent row {int(self.parents[row])})"


def _planned_rows(stage_dir) -> int:  # noqa: ANN001
    manifest = Manifest.open_existing(stage_dir)
    assert manifest is not None
    try:
        return manifest.counts()["rows"]
    finally:
        manifest.close()


class _PerChild(Reader):
    """Rows of another reader, one per child: ids and row count from the children."""

    def __init__(self, children: ChildRows, source: Reader, parents: Callable[[], np.ndarray]) -> None:
        super().__init__(children.spec)
        self.children = children
        self.source = source
        self._parents = parents

    @property
    def num_rows(self) -> int:
        return self.children.num_rows

    def fields(self) -> dict[str, FieldInfo]:
        return self.source.fields()

    def ids(self, start: int, stop: int) -> np.ndarray:
        return self.children.ids(start, stop)

    def where(self, row: int) -> str:
        return self.children.where(row)

    def _span(self, start: int, stop: int) -> tuple[np.ndarray, int, int]:
        parents = self._parents()[start:stop]
        if not len(parents):
            return parents, 0, 0
        return parents, int(parents[0]), int(parents[-1]) + 1

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        parents, first, last = self._span(start, stop)
        if not len(parents):
            info = self.fields()[field]
            return np.zeros((0, *(max(d, 0) for d in info.row_shape)), dtype=info.dtype)
        return np.asarray(self.source.read(field, first, last))[parents - first]

    def lengths(self, field: str, start: int, stop: int) -> np.ndarray:
        parents, first, last = self._span(start, stop)
        if not len(parents):
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self.source.lengths(field, first, last))[parents - first]

    def ok(self, start: int, stop: int) -> np.ndarray:
        """A child exists only for a parent that succeeded."""
        return np.ones(stop - start, dtype=bool)

    def errors(self, start: int, stop: int) -> list[RowError]:
        return []


class Broadcast(_PerChild):
    """A reader over an earlier row space seen per child (each child reads its ancestor's row)."""

    def __init__(self, children: ChildRows, source: Reader, space: ChildRows | None) -> None:
        super().__init__(children, source, lambda: children.to(space))


class FanOutReader(_PerChild):
    """The fan-out stage's outputs per child: the fanned outputs' k-th entry, the others repeated."""

    def __init__(self, children: ChildRows, fanned: set[str]) -> None:
        super().__init__(children, children.stage, lambda: children.parents)
        self.fanned = fanned

    def fields(self) -> dict[str, FieldInfo]:
        out = {}
        for name, info in self.source.fields().items():
            if name in self.fanned:
                info = FieldInfo(name, info.dtype, tuple(info.row_shape[1:]))
            out[name] = info
        return out

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        if field not in self.fanned:
            return super().read(field, start, stop)
        parents, first, last = self._span(start, stop)
        if not len(parents):
            info = self.fields()[field]
            return np.zeros((0, *(max(d, 0) for d in info.row_shape)), dtype=info.dtype)
        block = np.asarray(self.source.read(field, first, last))
        k = self.children.k[start:stop]
        if len(k) and int(k.max()) >= block.shape[1]:
            raise InputError(f"fan_out: '{self.children.count}' counts more entries than '{field}' holds "
                             f"({int(k.max()) + 1} > {block.shape[1]})")
        return block[parents - first, k]

    def lengths(self, field: str, start: int, stop: int) -> np.ndarray:
        if field not in self.fanned:
            return super().lengths(field, start, stop)
        return Reader.lengths(self, field, start, stop)
