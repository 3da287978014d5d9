"""Reads an earlier stage's committed part files as the input of the next stage.

A multi-stage job's stage k reads stage k-1's outputs row by row, as any reader would. The
earlier stage may still be running: a read of rows whose chunk is not committed yet waits
for it, so a later stage starts on the chunks an earlier one has finished. Rows that failed
in the earlier stage read as zeros and are marked failed again by `carry_failures`.

A ragged output (a variable first axis, e.g. per-residue states [-1, d]) is stored padded to
its chunk's longest row; it reads padded to the longest row of the rows read, and its
lengths come from the output the stage's `ragged` names (else the padded width).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..engine.dispatcher import CompletedChunk, stack_rows
from ..engine.manifest import MANIFEST_NAME, Manifest, RowError
from ..io.parts import Part
from ..io.readers import FieldInfo, InputError, Reader, open_reader
from ..spec import InputSpec


class StageAborted(Exception):
    """The earlier stage stopped before committing the rows a later stage waits for."""


class StageReader(Reader):
    """Rows of an earlier stage's outputs; ids come from the job's input file."""

    def __init__(
        self, stage_dir: Path, spec: InputSpec, upstream_failed: Callable[[], bool] = lambda: False,
        poll_s: float = 0.1, cached_chunks: int = 4, rows: Reader | None = None,
        ragged: dict[str, str] | None = None,
    ) -> None:
        """`rows`: the reader whose ids and row count the stage's rows have (a fan-out's children);
        unset: the job's input. `ragged`: output -> output holding each row's length."""
        super().__init__(spec)
        self.stage_dir = stage_dir
        self._failed = upstream_failed
        self._poll_s = poll_s
        self._own_input = rows is None
        self._input = rows if rows is not None else open_reader(spec)  # its own handle: the earlier stage reads it too
        self._ragged = dict(ragged or {})
        self._lock = threading.RLock()
        self._manifest: Manifest | None = None
        self._cache: OrderedDict[int, tuple[np.ndarray, dict[str, np.ndarray], list[RowError]]] = OrderedDict()
        self._cached_chunks = cached_chunks
        self._fields: dict[str, FieldInfo] | None = None

    # --- waiting on the earlier stage -------------------------------------------------
    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        while not ready():
            if self._failed():
                raise StageAborted(f"the earlier stage in {self.stage_dir} stopped before {what}")
            time.sleep(self._poll_s)

    def _open(self) -> Manifest:
        if self._manifest is None:
            path = self.stage_dir / MANIFEST_NAME

            def planned() -> bool:
                if not path.is_file():
                    return False
                manifest = Manifest(path)
                if manifest.has_plan() and manifest.meta("outputs") is not None:
                    self._manifest = manifest
                    return True
                manifest.close()
                return False

            self._wait(planned, "planning")
        assert self._manifest is not None
        return self._manifest

    # --- Reader ---------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self._input.num_rows

    def fields(self) -> dict[str, FieldInfo]:
        """The earlier stage's declared outputs (known once it has planned)."""
        from tensorfleet.core.codec import NUMPY_DTYPES

        with self._lock:
            if self._fields is None:
                declared = self._open().meta("outputs")
                self._fields = {
                    name: FieldInfo(name, np.dtype(NUMPY_DTYPES.get(datatype, "<f4")), tuple(shape))
                    for name, (datatype, shape) in declared.items()
                }
            return self._fields

    def ids(self, start: int, stop: int) -> np.ndarray:
        with self._lock:
            return self._input.ids(start, stop)

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        pieces = [values[field][a:b] for values, a, b in self._slices(start, stop)]
        if not pieces:
            info = self.fields()[field]
            return np.zeros((0, *(max(d, 0) for d in info.row_shape)), dtype=info.dtype)
        return stack_rows(pieces) if len(pieces) > 1 else pieces[0]  # ragged: padded to the longest

    def lengths(self, field: str, start: int, stop: int) -> np.ndarray:
        """A ragged output's real lengths (from its `ragged` length output), else the base rule."""
        info = self.fields()[field]
        if -1 not in info.row_shape:
            return super().lengths(field, start, stop)
        if field in self._ragged:
            return np.asarray(self.read(self._ragged[field], start, stop)).reshape(stop - start, -1)[:, 0].astype(np.int64)
        return np.full(stop - start, self.read(field, start, stop).shape[1], dtype=np.int64)

    def row_bytes(self, field: str) -> float:
        info = self.fields()[field]
        if info.is_bytes:
            return 256.0
        return float(info.dtype.itemsize * int(np.prod([d if d >= 0 else 256 for d in info.row_shape])))

    def ok(self, start: int, stop: int) -> np.ndarray:
        return np.concatenate([ok[a:b] for ok, a, b in self._slices(start, stop, want_ok=True)])

    def errors(self, start: int, stop: int) -> list[RowError]:
        with self._lock:
            self._slices(start, stop)
            return [e for _, _, errors in self._cache.values() for e in errors if start <= e.row < stop]

    def close(self) -> None:
        with self._lock:
            if self._own_input:
                self._input.close()
            if self._manifest is not None:
                self._manifest.close()
                self._manifest = None

    # --- chunks ---------------------------------------------------------------------------
    def _slices(self, start: int, stop: int, want_ok: bool = False) -> list:
        with self._lock:
            manifest = self._open()
            out = []
            for chunk in manifest.chunks():
                if chunk.stop <= start or chunk.start >= stop:
                    continue
                ok, values, _ = self._load(manifest, chunk.index, chunk.start, chunk.stop)
                a, b = max(start, chunk.start) - chunk.start, min(stop, chunk.stop) - chunk.start
                out.append((ok if want_ok else values, a, b))
            return out

    def _load(self, manifest: Manifest, index: int, start: int, stop: int):
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        self._wait(lambda: manifest.part_of(index) is not None, f"committing chunk {index}")
        with Part(self.stage_dir / manifest.part_of(index)) as part:
            ok = np.array(part.array("ok"), dtype=bool)
            values = {}
            stored = set(part.names)
            for name, info in self.fields().items():
                # the part's own row shape: a ragged output's (-1) axis is as wide as its chunk's longest row
                computed = part.array(name) if name in stored else None
                shape = computed.shape[1:] if computed is not None else tuple(max(d, 0) for d in info.row_shape)
                full = np.zeros((stop - start, *shape), dtype=info.dtype)
                if computed is not None:
                    full[ok] = computed
                values[name] = full
        entry = (ok, values, manifest.errors(start, stop))
        self._cache[index] = entry
        while len(self._cache) > self._cached_chunks:
            self._cache.popitem(last=False)
        return entry


class DeclaredOutputs(Reader):
    """An earlier stage's outputs as its model declares them: for planning (a dry run), never read."""

    def __init__(self, spec: InputSpec, rows: Reader, outputs: dict[str, tuple[str, list[int]]]) -> None:
        super().__init__(spec)
        self._rows = rows
        self._outputs = outputs

    @property
    def num_rows(self) -> int:
        return self._rows.num_rows

    def fields(self) -> dict[str, FieldInfo]:
        from tensorfleet.core.codec import NUMPY_DTYPES

        return {
            name: FieldInfo(name, np.dtype(NUMPY_DTYPES.get(datatype, "<f4")), tuple(shape))
            for name, (datatype, shape) in self._outputs.items()
        }

    def ids(self, start: int, stop: int) -> np.ndarray:
        return self._rows.ids(start, stop)

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        raise InputError(f"{field}: an earlier stage's output is known only once that stage runs")


class StagesReader(Reader):
    """What one stage reads: the previous stage's outputs by plain name, and `input:FIELD` (the
    job's input) or `STAGE:OUTPUT` (an earlier stage's output) by qualified name."""

    def __init__(self, spec: InputSpec, previous: Reader, named: dict[str, Reader]) -> None:
        super().__init__(spec)
        self.previous = previous
        self.named = named

    def _source(self, field: str) -> tuple[Reader, str]:
        where, colon, name = field.partition(":")
        if colon and where in self.named:
            return self.named[where], name
        return self.previous, field

    @property
    def num_rows(self) -> int:
        return self.previous.num_rows

    def fields(self) -> dict[str, FieldInfo]:
        out = dict(self.previous.fields())
        for where, reader in self.named.items():
            out.update({f"{where}:{name}": info for name, info in reader.fields().items()})
        return out

    def ids(self, start: int, stop: int) -> np.ndarray:
        return self.previous.ids(start, stop)

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        reader, name = self._source(field)
        return reader.read(name, start, stop)

    def lengths(self, field: str, start: int, stop: int) -> np.ndarray:
        reader, name = self._source(field)
        return reader.lengths(name, start, stop)

    def close(self) -> None:
        for reader in {id(r): r for r in [self.previous, *self.named.values()]}.values():
            reader.close()


def carry_failures(upstream: StageReader, stage: str) -> Callable[[Callable], Callable]:
    """Wrap a stage's commit so rows that failed upstream stay failed, with the upstream error."""

    def wrap(commit: Callable[[CompletedChunk], None]) -> Callable[[CompletedChunk], None]:
        def carried(done: CompletedChunk) -> None:
            chunk = done.chunk
            before = upstream.ok(chunk.start, chunk.stop)
            if before.all():
                commit(done)
                return
            keep = before[done.ok]  # among this stage's ok rows, those upstream also computed
            outputs = {name: values[keep] for name, values in done.outputs.items()}
            inherited = [
                RowError(e.row, e.id, e.code, e.message if e.message.startswith("stage ") else f"stage {stage}: {e.message}")
                for e in upstream.errors(chunk.start, chunk.stop)
            ]
            ours = [e for e in done.errors if before[e.row - chunk.start]]
            errors = sorted([*ours, *inherited], key=lambda e: e.row)
            commit(replace(done, ok=done.ok & before, outputs=outputs, errors=errors))

        return carried

    return wrap
