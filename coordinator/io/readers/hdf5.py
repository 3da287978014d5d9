"""HDF5: each model input is a dataset path (rows along axis 0); ids from a dataset if given.

A dataset the job reads is checked once, before its first byte is read, that its bytes are in
the file itself (safety.checked_dataset: no external link, external storage, virtual dataset).
"""

from __future__ import annotations

import h5py
import numpy as np

from ...spec import InputSpec
from .base import FieldInfo, InputError, Reader, register
from .safety import checked_dataset


def _field_info(name: str, dataset: h5py.Dataset) -> FieldInfo:
    is_string = h5py.check_string_dtype(dataset.dtype) is not None or dataset.dtype.kind in "OS"
    dtype = np.dtype(object) if is_string else dataset.dtype
    return FieldInfo(name, dtype, tuple(dataset.shape[1:]))


def as_bytes_array(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
    return out


def as_str_array(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    return out


@register("hdf5")
class Hdf5Reader(Reader):
    default_field = ""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        self._file = h5py.File(spec.path, "r")
        self._fields: dict[str, FieldInfo] = {}
        self._checked: dict[str, h5py.Dataset] = {}
        self._file.visititems(self._collect)
        if spec.ids and spec.ids not in self._fields:
            raise InputError(f"input.ids: no dataset '{spec.ids}' in {spec.path}")
        if len(self._fields) == 1:
            self.default_field = next(iter(self._fields))
        sizes = {len(self._dataset(name)) for name in spec.tensors.values() if name in self._fields}
        if spec.ids:
            sizes.add(len(self._dataset(spec.ids)))
        if len(sizes) > 1:
            raise InputError(f"{spec.path}: the mapped datasets differ in row count ({sorted(sizes)})")
        self._rows = sizes.pop() if sizes else (len(next(iter(self._file.values()))) if len(self._file) else 0)

    def _collect(self, name: str, item: object) -> None:
        if isinstance(item, h5py.Dataset) and item.shape:
            self._fields[name] = _field_info(name, item)

    def _dataset(self, name: str) -> h5py.Dataset:
        """A dataset this job reads, its storage checked the first time it is asked for."""
        if name not in self._checked:
            self._checked[name] = checked_dataset(self._file, name, self.spec.path)
        return self._checked[name]

    @property
    def num_rows(self) -> int:
        return self._rows

    def fields(self) -> dict[str, FieldInfo]:
        return self._fields

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        if field not in self._fields:
            raise InputError(f"no dataset '{field}' in {self.spec.path} (has: {sorted(self._fields)})")
        values = self._dataset(field)[start:stop]
        return as_bytes_array(values) if self._fields[field].is_bytes else values

    def ids(self, start: int, stop: int) -> np.ndarray:
        if not self.spec.ids:
            return super().ids(start, stop)
        return as_str_array(self._dataset(self.spec.ids)[start:stop])

    def close(self) -> None:
        self._file.close()
