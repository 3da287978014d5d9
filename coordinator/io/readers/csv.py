"""CSV / TSV through pyarrow's CSV reader: a column of strings (BYTES) or numbers per field.

A field is one column, or several numeric columns joined by commas ("x0,x1,x2"), stacked into
one vector per row. The file is read once, streaming, into a temporary parquet file (row
groups of one CSV block each) that the rows are then read from by range, so memory stays at
one block whatever the file's size; the temporary file goes when the reader closes. Column
types are inferred from the first block; a later value that does not fit is a clear error.
Plain or gzip-compressed files are read alike. A row longer than a block (4 MiB) is an error
(pyarrow's "straddling object"), so no cell grows past that.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ...spec import InputSpec
from .base import FieldInfo, InputError, Reader, register
from .parquet import ParquetReader
from .unpack import is_gzip

_BLOCK_BYTES = 4 << 20


def delimiter_of(spec_format: str | None, delimiter: str | None) -> str:
    return delimiter or ("\t" if spec_format == "tsv" else ",")


def _copy_to_parquet(source: Path, target: Path, delimiter: str) -> None:
    compression = "gzip" if is_gzip(source) else None  # two bytes read, not the file
    stream = pa.input_stream(str(source), compression=compression)
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
        )
        with pq.ParquetWriter(target, reader.schema) as writer:
            for batch in reader:
                writer.write_table(pa.Table.from_batches([batch]))
    except pa.ArrowInvalid as error:
        raise InputError(f"cannot read {source} as {'TSV' if delimiter == chr(9) else 'CSV'}: {error}") from None
    finally:
        stream.close()


@register("csv")
@register("tsv")
class CsvReader(Reader):
    default_field = ""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        source = Path(spec.path)
        if not source.is_file():
            raise FileNotFoundError(spec.path)
        self._folder = Path(tempfile.mkdtemp(prefix="tensorfleet-csv-"))
        try:
            target = self._folder / "table.parquet"
            _copy_to_parquet(source, target, delimiter_of(spec.format, spec.delimiter))
            self._table = ParquetReader(InputSpec(path=str(target), format="parquet", ids=spec.ids))
        except BaseException:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise
        self.default_field = self._table.default_field
        self._fields = dict(self._table.fields())
        for field in spec.tensors.values():  # comma-joined columns the job maps
            if "," in field:
                self._fields[field] = self._joined(field)

    @property
    def num_rows(self) -> int:
        return self._table.num_rows

    def fields(self) -> dict[str, FieldInfo]:
        return self._fields

    def _columns(self, field: str) -> list[str]:
        names = [name.strip() for name in field.split(",")]
        known = self._table.fields()
        unknown = [name for name in names if name not in known]
        if unknown:
            raise InputError(f"no column {unknown} in {self.spec.path} (has: {sorted(known)})")
        if len(names) > 1 and any(known[name].is_bytes or known[name].row_shape for name in names):
            raise InputError(f"field '{field}': only numeric columns can be joined into a vector")
        return names

    def _joined(self, field: str) -> FieldInfo:
        names = self._columns(field)
        dtype = np.result_type(*(self._table.fields()[name].dtype for name in names))
        return FieldInfo(field, dtype, (len(names),))

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        names = self._columns(field)
        if len(names) == 1:
            return self._table.read(names[0], start, stop)
        return np.stack([self._table.read(name, start, stop) for name in names], axis=1)

    def ids(self, start: int, stop: int) -> np.ndarray:
        return self._table.ids(start, stop)

    def close(self) -> None:
        self._table.close()
        shutil.rmtree(self._folder, ignore_errors=True)
