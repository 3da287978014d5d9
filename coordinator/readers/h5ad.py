"""AnnData .h5ad, read with h5py: X (dense or CSR), layers/NAME, obsm/NAME; obs names as ids."""

from __future__ import annotations

import h5py
import numpy as np

from ..spec import InputSpec
from .base import FieldInfo, InputError, Reader, register
from .hdf5 import as_str_array


def _encoding(item: h5py.Group | h5py.Dataset) -> str:
    value = item.attrs.get("encoding-type", "array")
    return value.decode() if isinstance(value, bytes) else str(value)


@register("h5ad")
class H5adReader(Reader):
    default_field = "X"

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        self._file = h5py.File(spec.path, "r")
        if "obs" not in self._file:
            raise InputError(f"{spec.path} has no obs group; is it an .h5ad file?")
        obs = self._file["obs"]
        index_key = obs.attrs.get("_index", "_index")
        index_key = index_key.decode() if isinstance(index_key, bytes) else index_key
        self._obs_names = obs[index_key]
        self._fields: dict[str, FieldInfo] = {}
        for name in ["X"] + [f"layers/{k}" for k in self._file.get("layers", {})] + [
            f"obsm/{k}" for k in self._file.get("obsm", {})
        ]:
            if name in self._file:
                self._fields[name] = self._info(name)

    def _info(self, name: str) -> FieldInfo:
        item = self._file[name]
        kind = _encoding(item)
        if isinstance(item, h5py.Dataset):
            return FieldInfo(name, item.dtype, tuple(item.shape[1:]))
        if kind in ("csr_matrix", "csc_matrix"):
            shape = tuple(int(v) for v in item.attrs["shape"])
            return FieldInfo(name, item["data"].dtype, shape[1:])
        raise InputError(f"{self.spec.path}: '{name}' has encoding '{kind}', which cannot feed a model")

    @property
    def num_rows(self) -> int:
        return len(self._obs_names)

    def fields(self) -> dict[str, FieldInfo]:
        return self._fields

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        if field not in self._fields:
            raise InputError(f"no field '{field}' in {self.spec.path} (has: {sorted(self._fields)})")
        item = self._file[field]
        if isinstance(item, h5py.Dataset):
            return item[start:stop]
        if _encoding(item) == "csc_matrix":
            raise InputError(
                f"{self.spec.path}: '{field}' is CSC, which cannot be read by row; "
                f"store it as CSR (adata.X = adata.X.tocsr())"
            )
        indptr = item["indptr"][start : stop + 1]
        lo, hi = int(indptr[0]), int(indptr[-1])
        data, indices = item["data"][lo:hi], item["indices"][lo:hi]
        info = self._fields[field]
        out = np.zeros((stop - start, *info.row_shape), dtype=info.dtype)
        rows = np.repeat(np.arange(stop - start), np.diff(indptr))
        out[rows, indices] = data
        return out

    def ids(self, start: int, stop: int) -> np.ndarray:
        return as_str_array(self._obs_names[start:stop])

    def close(self) -> None:
        self._file.close()
