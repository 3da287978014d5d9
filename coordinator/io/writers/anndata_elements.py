"""The few anndata on-disk elements the .h5ad writer adds, written with h5py alone.

The writer adds obs columns (numbers, booleans, text) and `uns["tensorfleet"]` (a dict of
scalars and one data frame) to a copy of the input. anndata's own `write_elem` would do it,
but importing anndata costs the coordinator more CPU than dispatching a 20,000-cell job
(issue 31: coordinator CPU per row), and these elements are a small, documented part of its
format (anndata's "On-disk format" page): each object carries `encoding-type` and
`encoding-version` attributes, and

- `array` 0.2.0: a dataset of numbers or booleans;
- `string-array` 0.2.0: a dataset of variable-length UTF-8 strings;
- `numeric-scalar` / `string` 0.2.0: a scalar dataset;
- `dict` 0.1.0: a group of elements;
- `dataframe` 0.2.0: a group of column elements, with attributes `_index` (the index
  element's name) and `column-order` (the columns' names, in order).

tests/coordinator read every output back with anndata itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np

_STRING = h5py.string_dtype("utf-8")


def _encoding(item: h5py.HLObject, kind: str, version: str) -> None:
    item.attrs["encoding-type"] = kind
    item.attrs["encoding-version"] = version


def _replace(group: h5py.Group, name: str) -> None:
    if name in group:
        del group[name]


def write_array(group: h5py.Group, name: str, values: np.ndarray | Sequence[Any]) -> None:
    """A 1-D column or array: numbers and booleans as `array`, text (str, bytes, object) as `string-array`."""
    _replace(group, name)
    values = np.asarray(values)
    if values.dtype.kind in "biuf":
        _encoding(group.create_dataset(name, data=values), "array", "0.2.0")
        return
    if values.dtype.kind == "U":  # str already: numpy makes the objects, no Python loop
        text = values.astype(object)
    else:
        text = np.array([v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in values.reshape(-1)],
                        dtype=object).reshape(values.shape)
    _encoding(group.create_dataset(name, data=text, dtype=_STRING), "string-array", "0.2.0")


def write_mostly_empty_text(group: h5py.Group, name: str, rows: int, text_at: Mapping[int, str]) -> None:
    """A `string-array` of `rows` strings, all "" except `text_at` (row -> text): "" is the
    dataset's declared fill value (every HDF5 reader returns it for an element never written),
    so a column of 200,000 ok rows writes no string at all. Converting 200,000 "" for h5py
    cost 0.08 s of a job's 3.6 s of coordinator CPU (issue 31)."""
    _replace(group, name)
    dataset = group.create_dataset(name, shape=(rows,), dtype=_STRING, fillvalue=b"")
    if text_at:
        values = np.full(rows, b"", dtype=object)
        for row, text in text_at.items():
            values[row] = text.encode(errors="replace")
        dataset[...] = values
    _encoding(dataset, "string-array", "0.2.0")


def write_scalar(group: h5py.Group, name: str, value: str | int | float | bool) -> None:
    _replace(group, name)
    if isinstance(value, str):
        _encoding(group.create_dataset(name, data=value, dtype=_STRING), "string", "0.2.0")
    else:
        _encoding(group.create_dataset(name, data=value), "numeric-scalar", "0.2.0")


def write_frame(group: h5py.Group, name: str, columns: Mapping[str, np.ndarray | Sequence[Any]]) -> None:
    """A data frame of equal-length columns, indexed 0..n-1 (as a default pandas index reads back)."""
    _replace(group, name)
    frame = group.create_group(name)
    _encoding(frame, "dataframe", "0.2.0")
    rows = len(next(iter(columns.values()))) if columns else 0
    frame.attrs["_index"] = "_index"
    frame.attrs["column-order"] = np.array(list(columns), dtype=object)
    write_array(frame, "_index", np.arange(rows).astype(str).astype(object))
    for column, values in columns.items():
        write_array(frame, column, values)


def write_dict(group: h5py.Group, name: str, mapping: Mapping[str, Any]) -> None:
    """A dict of scalars, 1-D arrays and dicts (nested the same way)."""
    _replace(group, name)
    inner = group.create_group(name)
    _encoding(inner, "dict", "0.1.0")
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            write_dict(inner, key, value)
        elif isinstance(value, (str, int, float, bool, np.number)):
            write_scalar(inner, key, value.item() if isinstance(value, np.number) else value)
        else:
            write_array(inner, key, value)
