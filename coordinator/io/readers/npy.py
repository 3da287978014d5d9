"""`.npy`: one memory-mapped array, field 'array'; ids are row numbers."""

from __future__ import annotations

import numpy as np

from ...spec import InputSpec
from .base import FieldInfo, InputError, Reader, register


@register("npy")
class NpyReader(Reader):
    default_field = "array"

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        self._array = np.load(spec.path, mmap_mode="r", allow_pickle=False)
        if self._array.ndim == 0:
            raise InputError(f"{spec.path} holds a scalar, not rows")
        if spec.ids:
            raise InputError("input.ids: .npy inputs have no id column; ids are row numbers")

    @property
    def num_rows(self) -> int:
        return int(self._array.shape[0])

    def fields(self) -> dict[str, FieldInfo]:
        return {"array": FieldInfo("array", self._array.dtype, tuple(self._array.shape[1:]))}

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        if field != "array":
            raise InputError(f".npy has one field, 'array', not '{field}'")
        return np.array(self._array[start:stop])

    def close(self) -> None:
        mmap = getattr(self._array, "_mmap", None)
        del self._array
        if mmap is not None:
            mmap.close()
