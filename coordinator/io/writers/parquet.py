"""parquet: id, one column per output (vectors as fixed-size lists), ok, error; provenance in metadata.

Failing rows also go to a sibling `<name>.errors.parquet` (row, id, code, message).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .base import Column, WriteContext, Writer, register

#: Flush a row group early when this much is buffered, whatever row_group_size says.
MAX_BUFFER_BYTES = 64 << 20


def _is_text(column: Column) -> bool:
    """A text field of the input's own (the `source_file` of several input files): a string column."""
    return column.from_input and column.dtype.hasobject and not column.row_shape


def arrow_type(column: Column) -> pa.DataType:
    if _is_text(column) or (column.kept and column.dtype.hasobject):
        kind = pa.string()
    else:
        kind = pa.binary() if column.dtype.hasobject else pa.from_numpy_dtype(column.dtype)
    for size in reversed(column.row_shape):
        kind = pa.list_(kind, size)
    return kind


def arrow_array(values: np.ndarray, column: Column) -> pa.Array:
    if _is_text(column) or (column.kept and values.dtype.hasobject):  # input text, as it was in the input
        flat = pa.array([_text(v) for v in values.reshape(-1)], pa.string())
    elif values.dtype.hasobject:  # BYTES: binary cells, the model's bytes unchanged
        flat = pa.array(list(values.reshape(-1)), pa.binary())
    else:
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(column.row_shape):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def errors_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(path.suffix) + ".errors.parquet")


@register("parquet")
class ParquetWriter(Writer):
    def __init__(self, context: WriteContext) -> None:
        super().__init__(context)
        fields = [pa.field("id", pa.string())]
        fields += [pa.field(c.name, arrow_type(c)) for c in context.columns]
        fields += [pa.field("ok", pa.bool_()), pa.field("error", pa.string())]
        metadata = {b"tensorfleet": json.dumps(context.provenance, sort_keys=True).encode()}
        self._schema = pa.schema(fields, metadata=metadata)
        self._writer = pq.ParquetWriter(
            context.temp_path, self._schema, compression=context.spec.compression or "snappy"
        )
        self._buffer: list[pa.Table] = []
        self._buffered_rows = 0
        self._buffered_bytes = 0

    def write(self, start, ids, arrays, ok, error) -> None:
        columns = [pa.array(list(ids), pa.string())]
        columns += [arrow_array(arrays[c.name], c) for c in self.context.columns]
        columns += [pa.array(ok, pa.bool_()), pa.array(list(error), pa.string())]
        table = pa.Table.from_arrays(columns, schema=self._schema)
        self._buffer.append(table)
        self._buffered_rows += table.num_rows
        self._buffered_bytes += table.nbytes
        if self._buffered_rows >= self.context.spec.row_group_size or self._buffered_bytes >= MAX_BUFFER_BYTES:
            self._flush(whole_groups_only=self._buffered_bytes < MAX_BUFFER_BYTES)

    def _flush(self, whole_groups_only: bool = False) -> None:
        """Write buffered rows as row groups of exactly row_group_size (the last one may be short)."""
        if not self._buffer:
            return
        size = self.context.spec.row_group_size
        table = pa.concat_tables(self._buffer).combine_chunks()
        cut = (table.num_rows // size) * size if whole_groups_only else table.num_rows
        if cut:
            self._writer.write_table(table.slice(0, cut), row_group_size=size)
        rest = table.slice(cut)
        self._buffer = [rest] if rest.num_rows else []
        self._buffered_rows = rest.num_rows
        self._buffered_bytes = rest.nbytes if rest.num_rows else 0

    def finish(self) -> list[Path]:
        self._flush()
        self._writer.close()
        errors = self.context.errors
        if not errors:
            return []
        table = pa.table(
            {
                "row": pa.array([e.row for e in errors], pa.int64()),
                "id": [e.id for e in errors],
                "code": [e.code for e in errors],
                "message": [e.message for e in errors],
            }
        )
        side = errors_path(self.context.temp_path)
        pq.write_table(table, side)
        return [side]

    def abort(self) -> None:
        self._writer.close()

    @staticmethod
    def side_files(final: Path) -> list[Path]:
        return [errors_path(final)]
