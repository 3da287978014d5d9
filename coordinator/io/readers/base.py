"""The reader interface and its registry. A new input format is one new file that registers itself.

Readers read by row range, so a 20 GB input is never loaded whole.
"""

from __future__ import annotations

import abc
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorfleet.core.extras import EXTRAS, missing_module_message

from ...spec import InputSpec


class InputError(Exception):
    """The input cannot be read as the job says (missing, corrupt, wrong field): a fatal error."""


@dataclass(frozen=True)
class FieldInfo:
    """One readable field: numpy dtype (object = BYTES) and the shape of one row."""

    name: str
    dtype: np.dtype
    row_shape: tuple[int, ...]

    @property
    def is_bytes(self) -> bool:
        return self.dtype == np.dtype(object)


class Reader(abc.ABC):
    """Random access to rows [start, stop) of one input file."""

    #: The field a one-input model reads when the job names none.
    default_field: str = ""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    @property
    @abc.abstractmethod
    def num_rows(self) -> int: ...

    @abc.abstractmethod
    def fields(self) -> dict[str, FieldInfo]:
        """Every field this input offers (not only the mapped ones)."""

    @abc.abstractmethod
    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one field; BYTES fields as object arrays of bytes."""

    def read_block(self, field: str, start: int, stop: int) -> Any:
        """Rows [start, stop) of one field as the request source keeps them between requests
        (engine/source.py reads each chunk's rows once, in one block, and slices requests from
        it): a numpy array, or a `scipy.sparse.csr_matrix` for rows stored sparse (h5ad), kept
        sparse. Readers that can seek read only these rows."""
        return self.read(field, start, stop)

    def row_bytes(self, field: str) -> float:
        """About how many bytes one row of `field` takes in a block: sizes the source's blocks."""
        info = self.fields()[field]
        if info.is_bytes:
            return 256.0
        return float(info.dtype.itemsize * (int(np.prod(info.row_shape)) if info.row_shape else 1))

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Row ids as an object array of str; row numbers where the input has none."""
        return np.array([str(row) for row in range(start, stop)], dtype=object)

    def lengths(self, field: str, start: int, stop: int) -> np.ndarray:
        """Tokens per row, for token-budget batching: element count of each row."""
        info = self.fields()[field]
        if info.is_bytes:
            return np.array([len(item) for item in self.read(field, start, stop)], dtype=np.int64)
        per_row = int(np.prod(info.row_shape)) if info.row_shape else 1
        return np.full(stop - start, per_row, dtype=np.int64)

    def where(self, row: int) -> str:
        """Where a row sits in the file, for error messages (FASTA: record and line number)."""
        return f"row {row}"

    def row_errors(self, start: int, stop: int) -> dict[int, str]:
        """Rows of [start, stop) the input itself makes unusable, and why; they are never sent."""
        return {}

    @property
    def checks_rows(self) -> bool:
        """Whether `row_errors` does any work (it may read): a reader that keeps the default has
        no row errors, and its requests can be built from kept blocks without a read."""
        return type(self).row_errors is not Reader.row_errors

    def stored_fields(self) -> list[FieldInfo]:
        """Per-row fields the output keeps beside the model's outputs (e.g. `truncated`)."""
        return []

    def close(self) -> None:
        """Release file handles."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The one place formats are listed: format -> module of this package that registers it.
#: Modules are imported on first use, so a run pays only for the libraries it needs.
MODULES: dict[str, str] = {
    "fasta": "fasta", "hdf5": "hdf5", "h5ad": "h5ad", "npy": "npy", "parquet": "parquet", "csv": "csv", "tsv": "csv",
}

_REGISTRY: dict[str, Callable[[InputSpec], Reader]] = {}


def register(fmt: str) -> Callable[[type[Reader]], type[Reader]]:
    def decorate(cls: type[Reader]) -> type[Reader]:
        _REGISTRY[fmt] = cls
        return cls

    return decorate


def open_reader(spec: InputSpec) -> Reader:
    """The registered reader for spec.format, opened; InputError if the file cannot be read."""
    _load(spec.format)
    factory = _REGISTRY.get(spec.format or "")
    if factory is None:
        raise InputError(f"input.format '{spec.format}' has no reader (known: {sorted(MODULES)})")
    try:
        reader = factory(spec)
        try:
            check_declared_sizes(spec.path, reader.num_rows, reader.fields())
        except InputError:
            reader.close()
            raise
        return reader
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"input file {spec.path} does not exist; fix input.path") from None
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"cannot read {spec.path} as {spec.format}: {error}") from None


#: Bounds on what an input file may declare: a header is free to write, memory is not.
MAX_ROW_BYTES = int(os.environ.get("TENSORFLEET_MAX_ROW_BYTES", str(256 * 1024 * 1024)))
MAX_ROWS = 2**40
MAX_ITEM_BYTES = 1 << 20
#: One column's row group, decoded (parquet reads whole row groups).
MAX_ROW_GROUP_BYTES = int(os.environ.get("TENSORFLEET_MAX_ROW_GROUP_BYTES", str(8 << 30)))
_PLAIN_KINDS = "biufcSUO"  # bool, ints, floats, complex, byte strings, unicode, object (BYTES)


def check_declared_sizes(path: str, rows: int, fields: dict[str, FieldInfo]) -> None:
    """InputError (naming the field) for declared shapes or dtypes no job could read, before any read.

    Readers call nothing large before this: shapes come from headers (HDF5, npy, parquet metadata)."""
    if rows < 0 or rows > MAX_ROWS:
        raise InputError(f"{path}: declares {rows} rows; at most {MAX_ROWS}")
    for name, info in fields.items():
        dtype = np.dtype(info.dtype)
        if dtype.kind not in _PLAIN_KINDS or dtype.fields is not None or dtype.itemsize > MAX_ITEM_BYTES:
            raise InputError(f"{path}: field '{name}' has dtype {dtype} ({dtype.itemsize} bytes per item); "
                             "inputs hold numbers or strings")
        if any(int(dim) < 0 for dim in info.row_shape):
            raise InputError(f"{path}: field '{name}' declares a negative dimension {info.row_shape}")
        row_bytes = dtype.itemsize
        for dim in info.row_shape:
            row_bytes *= int(dim)
        if row_bytes > MAX_ROW_BYTES:
            raise InputError(
                f"{path}: field '{name}' declares rows of shape {tuple(info.row_shape)} {dtype} = {row_bytes} bytes "
                f"each; at most {MAX_ROW_BYTES} (TENSORFLEET_MAX_ROW_BYTES)"
            )


def _load(fmt: str | None) -> None:
    module = MODULES.get(fmt or "")
    if module and fmt not in _REGISTRY:
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as error:
            if (error.name or "").partition(".")[0] not in EXTRAS:
                raise
            raise InputError(missing_module_message(error, f"reading {fmt} input")) from None
