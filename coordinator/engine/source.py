"""Turn planned row ranges into inference requests: read the mapped fields, cast, encode.

Every request carries `tensorfleet.exclusive = true`, so the server runs its rows as one
batch on their own and the numbers never depend on what else was in flight.

Rows are read once per chunk, in one block per field (`Reader.read_block`), and every request
of the chunk is sliced from that block in memory, whatever the order of its rows (a chunk
sorted by length picks rows all over its span): a request costs its own rows, never a re-read
of the span they sit in. A block covers the whole chunk when it fits `BLOCK_BYTES` per field,
else a window of rows from the first one a request needs; at most `MAX_BLOCKS` are kept (the
chunks being computed), and the dispatcher drops a chunk's blocks once the chunk is complete.
Rows stored sparse stay sparse in the block; they are densified per request, or sent as CSR
(three tensors, docs/protocol.md) to a model input that declares `sparse: csr`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from tensorfleet.client.messages import build_wire_request
from tensorfleet.core.codec import NUMPY_DTYPES
from tensorfleet.core.sparse import as_csr, csr_tensors
from tensorfleet.core.wire import InferRequest

from ..io.readers import FieldInfo, Reader

EXCLUSIVE = "tensorfleet.exclusive"
CONTEXT = "tensorfleet.context"
CONTEXT_PUT = "tensorfleet.context_put"

#: Bytes of one field a block may hold (estimated from Reader.row_bytes) before it is cut
#: into windows; a chunk is read whole when it fits.
BLOCK_BYTES = 64 << 20
#: Blocks kept at once: the chunks in flight across servers (more only costs re-reads).
MAX_BLOCKS = 8


def _is_sparse(values: Any) -> bool:
    return hasattr(values, "tocsr") and hasattr(values, "indptr")


class _Block:
    """Rows [start, stop) of every mapped field, as the reader returned them."""

    __slots__ = ("start", "stop", "values")

    def __init__(self, start: int, stop: int, values: dict[str, Any]) -> None:
        self.start, self.stop, self.values = start, stop, values


class RowsRejected(Exception):
    """Rows of a request the input itself makes unusable (FASTA stop codons, over-length under
    input.over_length: error): they fail alone, with these messages, and are never sent."""

    def __init__(self, errors: dict[int, str]) -> None:
        super().__init__(f"{len(errors)} rows rejected")
        #: offset within the request's rows -> why
        self.errors = errors


class FieldMappingError(Exception):
    """The job maps fields that do not fit the model's inputs; says what to change."""


def resolve_fields(
    mapping: dict[str, str], reader: Reader, model_inputs: dict[str, tuple[str, list[int]]], optional: set[str]
) -> dict[str, str]:
    """model input -> input field, checked against the model's inputs and the file's fields."""
    fields = reader.fields()
    if not mapping:
        required = [name for name in model_inputs if name not in optional]
        if len(required) != 1 or not reader.default_field:
            raise FieldMappingError(
                f"set input.tensors (model input -> field): the model takes {sorted(model_inputs)}, "
                f"the input offers {sorted(fields)}"
            )
        mapping = {required[0]: reader.default_field}
    for name, field in mapping.items():
        if name not in model_inputs:
            raise FieldMappingError(f"input.tensors: the model has no input '{name}' (it has {sorted(model_inputs)})")
        if field not in fields:
            raise FieldMappingError(f"input.tensors.{name}: the input has no field '{field}' (it has {sorted(fields)})")
        check_field(name, fields[field], *model_inputs[name])
    missing = [name for name in model_inputs if name not in mapping and name not in optional]
    if missing:
        raise FieldMappingError(f"input.tensors: the model's inputs {missing} are not mapped to any field")
    return dict(mapping)


def check_field(name: str, info: FieldInfo, datatype: str, shape: list[int]) -> None:
    if (datatype == "BYTES") != info.is_bytes:
        want = "strings (BYTES)" if datatype == "BYTES" else f"numbers ({datatype})"
        raise FieldMappingError(f"input.tensors.{name}: field '{info.name}' does not hold {want}")
    if datatype == "BF16":
        raise FieldMappingError(f"input '{name}' is BF16, which the coordinator cannot send yet")
    if datatype != "BYTES" and (
        len(shape) != len(info.row_shape)
        or any(want not in (-1, have) for want, have in zip(shape, info.row_shape, strict=False))
    ):
        raise FieldMappingError(
            f"input.tensors.{name}: field '{info.name}' rows have shape {list(info.row_shape)}, "
            f"the model wants {shape}"
        )


def _row_range(rows: slice | np.ndarray) -> tuple[int, int]:
    """The [lo, hi) span of a range or of row indices."""
    if isinstance(rows, slice):
        return rows.start, rows.stop
    return int(rows.min()), int(rows.max()) + 1


class RequestSource:
    """Reads rows for one model's requests. Its reading methods hold one lock, so one thread at a
    time reads: the reader thread for block reads, the event loop for `cached_request`."""

    def __init__(
        self, reader: Reader, fields: dict[str, str], datatypes: dict[str, str], model: str, version: str = ""
    ) -> None:
        self.reader = reader
        self.fields = fields
        self.datatypes = datatypes
        self.model = model
        self.version = version
        #: A stored context (prompt): (id, tensors), put once per stream, referenced by every request.
        self.context: tuple[str, dict[str, np.ndarray]] | None = None
        #: Outputs to ask for (the ones the job stores); None: every output the model has.
        self.outputs: list[str] | None = None
        #: The job's model.parameters: OIP request parameters on every request.
        self.parameters: dict[str, str | int | float | bool] = {}
        #: Model inputs that take CSR rows (`sparse: csr`): sent as three tensors (core/sparse.py).
        self.sparse: set[str] = set()
        self._blocks: OrderedDict[tuple[int, int], _Block] = OrderedDict()
        self._block_rows: int | None = None
        self._lock = threading.RLock()
        # a reader that checks rows itself (FASTA, over-length) may read to do so: its requests stay on the reader thread
        self._checks_rows = reader.checks_rows

    def inputs(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return self.inputs_at(slice(start, stop))

    def inputs_at(self, rows: slice | np.ndarray, span: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """The mapped fields of these rows (a range, or row indices), sliced from the block that
        holds them; `span`: the chunk's rows [start, stop), which the block is read for."""
        with self._lock:
            return self._inputs_at(rows, span)

    def _inputs_at(self, rows: slice | np.ndarray, span: tuple[int, int] | None) -> dict[str, np.ndarray]:
        lo, hi = _row_range(rows)
        block = self._block(lo, hi, span or (lo, hi))
        if isinstance(rows, slice):
            pick: slice | np.ndarray = slice(lo - block.start, hi - block.start)
        else:
            pick = rows - block.start
        out = {}
        for name in self.fields:
            values = block.values[name][pick]
            datatype = self.datatypes[name]
            if name in self.sparse:
                out.update(csr_tensors(name, as_csr(values), NUMPY_DTYPES[datatype]))
                continue
            if _is_sparse(values):
                values = values.toarray()
            if datatype != "BYTES":
                values = np.ascontiguousarray(values, dtype=NUMPY_DTYPES[datatype])
            out[name] = values
        return out

    def _block(self, lo: int, hi: int, span: tuple[int, int]) -> _Block:
        """The kept block holding rows [lo, hi), else one read now: the whole span when it fits
        BLOCK_BYTES, else a window from `lo`."""
        for key, block in reversed(self._blocks.items()):
            if block.start <= lo and hi <= block.stop:
                self._blocks.move_to_end(key)
                return block
        start, stop = span
        if not (start <= lo and hi <= stop):
            start, stop = lo, hi
        window = self._window_rows()
        if stop - start > window:
            start, stop = lo, min(stop, max(hi, lo + window))
        values = {name: self.reader.read_block(field, start, stop) for name, field in self.fields.items()}
        block = self._blocks[(start, stop)] = _Block(start, stop, values)
        while len(self._blocks) > MAX_BLOCKS:
            self._blocks.popitem(last=False)
        return block

    def _window_rows(self) -> int:
        if self._block_rows is None:
            widest = max((self.reader.row_bytes(field) for field in self.fields.values()), default=1.0)
            self._block_rows = max(1, int(BLOCK_BYTES / max(widest, 1.0)))
        return self._block_rows

    def release(self, start: int, stop: int) -> None:
        """Drop the blocks of rows [start, stop) (a committed chunk): they are not read again.
        Call from the thread that builds requests."""
        with self._lock:
            self._release(start, stop)

    def _release(self, start: int, stop: int) -> None:
        for key in [key for key in self._blocks if start <= key[0] and key[1] <= stop]:
            del self._blocks[key]

    def rejected(self, rows: slice | np.ndarray) -> dict[int, str]:
        """Offsets within `rows` of the rows the reader refuses, and why."""
        if isinstance(rows, slice):
            errors = self.reader.row_errors(rows.start, rows.stop)
            return {row - rows.start: message for row, message in errors.items()}
        errors = self.reader.row_errors(int(rows.min()), int(rows.max()) + 1)
        return {offset: errors[int(row)] for offset, row in enumerate(rows) if int(row) in errors}

    def describe_row(self, row: int, row_id: str) -> str:
        """Where a row is, for its error message: its position in the file and its id."""
        return f"{self.reader.where(row)}, id '{row_id}'"

    def request(
        self, request_id: str, rows: slice | np.ndarray, span: tuple[int, int] | None = None
    ) -> InferRequest:
        """The request for these rows (of the chunk `span`); RowsRejected when the reader refuses some."""
        with self._lock:
            return self._request(request_id, rows, span)

    def cached_request(
        self, request_id: str, rows: slice | np.ndarray, span: tuple[int, int] | None = None
    ) -> InferRequest | None:
        """`request`, built now on the caller's thread when that costs no read: the rows sit in a
        kept block, the reader checks no rows itself, and no other thread is reading (else None:
        build it on the reader thread). Most requests of a chunk take this path, which saves the
        event loop a thread hand-off (two wake-ups) per request."""
        if self._checks_rows or not self._lock.acquire(blocking=False):
            return None
        try:
            lo, hi = _row_range(rows)
            if not any(block.start <= lo and hi <= block.stop for block in self._blocks.values()):
                return None
            return self._request(request_id, rows, span)
        finally:
            self._lock.release()

    def _request(
        self, request_id: str, rows: slice | np.ndarray, span: tuple[int, int] | None = None
    ) -> InferRequest:
        refused = self.rejected(rows)
        if refused:
            raise RowsRejected(refused)
        parameters: dict = {**self.parameters, EXCLUSIVE: True}
        if self.context is not None:
            parameters[CONTEXT] = self.context[0]
        return build_wire_request(
            self.model, self._inputs_at(rows, span), request_id=request_id, parameters=parameters,
            version=self.version, outputs=self.outputs,
        )

    def preamble(self) -> list[InferRequest]:
        """Requests every new stream sends first: the context put, when the job has a context."""
        if self.context is None:
            return []
        context_id, tensors = self.context
        return [build_wire_request(
            self.model, tensors, request_id=f"context:{context_id}", parameters={CONTEXT_PUT: context_id},
            version=self.version,
        )]

    def ids(self, start: int, stop: int) -> np.ndarray:
        with self._lock:
            return self.reader.ids(start, stop)
