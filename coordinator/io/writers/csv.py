"""CSV / TSV through pyarrow's CSV writer: id, the outputs, ok, error, one row per input row in order.

A text table has no list cells, so a vector output NAME [k] becomes columns NAME_0 .. NAME_k-1
(a matrix output NAME_i_j); scalars, strings and one-value outputs ([1]) keep their name. Failed rows have empty
output cells. Beside `out.csv` go `out.errors.csv` (row, id, code, message; only when rows
failed) and `out.provenance.json` (what the parquet and HDF5 outputs carry as metadata).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from .base import Column, WriteContext, Writer, register


def _side(path: Path, kind: str) -> Path:
    return path.with_name(path.name.removesuffix(path.suffix) + kind)


def _names(column: Column) -> list[str]:
    if not column.row_shape or column.row_shape == (1,):  # one value a row keeps its name: no `_0`
        return [column.name]
    return [column.name + "".join(f"_{i}" for i in index) for index in itertools.product(*map(range, column.row_shape))]


def _text(values: np.ndarray) -> list[str | None]:
    """BYTES cells as text: UTF-8, bytes that are not UTF-8 replaced (a text table holds text)."""
    return [v.decode(errors="replace") if isinstance(v, bytes) else None if v is None else str(v) for v in values]


def _cells(values: np.ndarray, ok: np.ndarray, column: Column) -> list[pa.Array]:
    flat = np.ascontiguousarray(values).reshape(len(values), -1)
    mask = None if column.kept else ~ok  # a kept input column is the input's, failed rows too
    if values.dtype.hasobject:
        return [pa.array(_text(flat[:, i]), pa.string(), mask=mask) for i in range(flat.shape[1])]
    return [pa.array(flat[:, i], mask=mask) for i in range(flat.shape[1])]


class _TableWriter(Writer):
    suffix = ".csv"
    delimiter = ","

    def __init__(self, context: WriteContext) -> None:
        super().__init__(context)
        self._writer: pacsv.CSVWriter | None = None
        self._options = pacsv.WriteOptions(delimiter=self.delimiter)

    def write(self, start, ids, arrays, ok, error) -> None:
        names = ["id"]
        cells: list[pa.Array] = [pa.array(list(ids), pa.string())]
        for column in self.context.columns:
            names += _names(column)
            cells += _cells(arrays[column.name], ok | column.from_input, column)  # input fields: every row
        names += ["ok", "error"]
        cells += [pa.array(ok, pa.bool_()), pa.array(list(error), pa.string())]
        table = pa.Table.from_arrays(cells, names=names)
        if self._writer is None:
            self._writer = pacsv.CSVWriter(str(self.context.temp_path), table.schema, write_options=self._options)
        self._writer.write_table(table)

    def finish(self) -> list[Path]:
        if self._writer is not None:
            self._writer.close()
        side = []
        errors = self.context.errors
        if errors:
            table = pa.table(
                {
                    "row": pa.array([e.row for e in errors], pa.int64()),
                    "id": [e.id for e in errors],
                    "code": [e.code for e in errors],
                    "message": [e.message for e in errors],
                }
            )
            path = _side(self.context.temp_path, f".errors{self.suffix}")
            pacsv.write_csv(table, path, write_options=self._options)
            side.append(path)
        provenance = _side(self.context.temp_path, ".provenance.json")
        provenance.write_text(json.dumps(self.context.provenance, sort_keys=True, indent=1, default=str))
        return [*side, provenance]

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()

    @classmethod
    def side_files(cls, final: Path) -> list[Path]:
        return [_side(final, f".errors{cls.suffix}"), _side(final, ".provenance.json")]


@register("csv")
class CsvWriter(_TableWriter):
    pass


@register("tsv")
class TsvWriter(_TableWriter):
    suffix = ".tsv"
    delimiter = "\t"
