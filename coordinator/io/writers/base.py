"""The writer interface and its registry. A new output format is one new file that registers itself.

The merge calls `write` chunk by chunk in input order, then `finish`; the writer writes to a
temporary path the merge renames into place, so a half-written file never looks finished.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tensorfleet.core.extras import EXTRAS, missing_module_message

from ...spec import InputSpec, OutputSpec
from ..encoded_strings import EncodedStrings
from ..row_error import RowError


@dataclass(frozen=True)
class Column:
    """One stored output: its stored name, the model output it comes from, dtype and row shape."""

    name: str
    source: str
    dtype: np.dtype
    row_shape: tuple[int, ...]
    #: For a ragged output (`output.ragged`): the model output holding each row's length. Its
    #: row_shape is then one entry's shape, and `write` gets a `Ragged` for it.
    lengths_from: str | None = None
    #: A per-row field of the input's own (e.g. `truncated`), kept beside the outputs: an
    #: .h5ad output puts a scalar one in obs, as anndata users expect, not in obsm.
    from_input: bool = False
    #: A field kept from the input (output.keep_input): written for every row, failed ones too,
    #: and a BYTES one as text (strings where the format tells them from bytes: parquet), not
    #: as the binary a model's BYTES output is.
    kept: bool = False

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize if self.row_shape else self.dtype.itemsize


@dataclass(frozen=True)
class Ragged:
    """A ragged column's rows for one write: entries of all rows back to back, and each row's count."""

    values: np.ndarray
    lengths: np.ndarray


@dataclass
class WriteContext:
    spec: OutputSpec
    input: InputSpec
    temp_path: Path
    columns: list[Column]
    rows: int
    provenance: dict[str, Any]
    errors: list[RowError]
    limit: int | None


class Writer(abc.ABC):
    def __init__(self, context: WriteContext) -> None:
        self.context = context

    @abc.abstractmethod
    def write(self, start: int, ids: np.ndarray, arrays: dict[str, np.ndarray], ok: np.ndarray, error: np.ndarray) -> None:
        """Rows [start, start + len(ids)): ids (str), stored arrays by column name, ok, error text."""

    def write_encoded(self, start: int, ids: EncodedStrings, arrays: dict[str, np.ndarray], ok: np.ndarray,
                      error: np.ndarray) -> None:
        """`write` with the ids as the part stores them (the merge calls this): a writer that can
        use the bytes (the .h5ad writer compares them with its obs names) saves a str per row."""
        self.write(start, ids.decoded(), arrays, ok, error)

    @abc.abstractmethod
    def finish(self) -> list[Path]:
        """Write the errors table and provenance, flush and close. Returns side files written."""

    def abort(self) -> None:
        """Close without finishing; the merge removes the temporary file."""

    @staticmethod
    def side_files(final: Path) -> list[Path]:
        """Files this format may write beside `final`; a merge removes stale ones it did not rewrite."""
        return []


#: The one place formats are listed: format -> module of this package that registers it.
#: Modules are imported on first use, so a run pays only for the libraries it needs.
MODULES: dict[str, str] = {"hdf5": "hdf5", "parquet": "parquet", "h5ad": "h5ad", "csv": "csv", "tsv": "csv"}

_REGISTRY: dict[str, Callable[[WriteContext], Writer]] = {}


def register(fmt: str) -> Callable[[type[Writer]], type[Writer]]:
    def decorate(cls: type[Writer]) -> type[Writer]:
        _REGISTRY[fmt] = cls
        return cls

    return decorate


def writer_class(fmt: str | None) -> Callable[[WriteContext], Writer] | None:
    _load(fmt)
    return _REGISTRY.get(fmt or "")


def open_writer(context: WriteContext) -> Writer:
    _load(context.spec.format)
    factory = _REGISTRY.get(context.spec.format or "")
    if factory is None:
        raise ValueError(f"output.format '{context.spec.format}' has no writer (known: {sorted(MODULES)})")
    return factory(context)


def rows_per_chunk(row_bytes: int, target: int = 1 << 20) -> int:
    return max(1, target // max(row_bytes, 1))


def _load(fmt: str | None) -> None:
    module = MODULES.get(fmt or "")
    if module and fmt not in _REGISTRY:
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as error:
            if (error.name or "").partition(".")[0] not in EXTRAS:
                raise
            raise ValueError(missing_module_message(error, f"writing {fmt} output")) from None
