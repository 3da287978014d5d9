"""Merge queued requests into one batch and split the batch's outputs back, per request.

Kept apart from the batching loop so both halves are testable on plain arrays. Ragged
inputs are padded to the longest request in the batch; ragged outputs are cut back to
each request's own length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorfleet.core.codec import NUMPY_DTYPES, float32_to_bf16_words
from tensorfleet.core.errors import InternalError
from tensorfleet.core.sparse import as_csr

from ..model_config import ModelConfig, TensorSpec
from ..validation import DecodedRequest


@dataclass(frozen=True)
class RowSlice:
    """Where one request's rows sit in the merged batch, and its own ragged length."""

    start: int
    stop: int
    length: int


def _ragged_axis(spec: TensorSpec) -> int:
    return spec.shape.index(-1) + 1  # +1: the batch axis comes first


def _pad(array: np.ndarray, axis: int, target: int, value: float) -> np.ndarray:
    missing = target - array.shape[axis]
    if missing <= 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, missing)
    return np.pad(array, widths, constant_values=value)


def stack_csr(arrays: Sequence[Any]) -> Any:
    import scipy.sparse

    if len(arrays) == 1:
        return as_csr(arrays[0])
    return scipy.sparse.vstack([as_csr(a) for a in arrays], format="csr")


class BatchAssembly:
    """The id map between a merged batch and the requests it came from."""

    def __init__(self, config: ModelConfig, requests: Sequence[DecodedRequest]) -> None:
        self.config = config
        self.requests = list(requests)
        self.slices: list[RowSlice] = []
        start = 0
        for request in self.requests:
            self.slices.append(RowSlice(start, start + request.rows, request.length))
            start += request.rows
        self.rows = start
        #: the outputs some request of the batch asked for; None when one asked for all
        self.wanted: frozenset[str] | None = (
            None if any(not r.requested_outputs for r in self.requests)
            else frozenset(name for r in self.requests for name in r.requested_outputs)
        )

    def merge(self) -> dict[str, np.ndarray]:
        """One array per input, requests stacked along the batch axis in order."""
        if not self.config.batched:
            if len(self.requests) != 1:
                raise InternalError("a model without a batch dimension runs one request at a time")
            return self.requests[0].inputs
        bucket = self.config.batching.length_bucket if self.config.batching.pad_to_bucket else 1
        if len(self.requests) == 1 and bucket == 1:
            return self.requests[0].inputs  # nothing to pad or stack: no copy
        merged: dict[str, np.ndarray] = {}
        for spec in self.config.inputs:
            arrays = [r.inputs[spec.name] for r in self.requests if spec.name in r.inputs]
            if not arrays:
                continue
            if len(arrays) != len(self.requests):
                raise InternalError(f"optional input '{spec.name}' is set in only some requests")
            if spec.sparse:  # CSR rows (or dense ones a client sent): stacked as CSR
                merged[spec.name] = stack_csr(arrays)
                continue
            if spec.ragged and spec.datatype != "BYTES":
                axis = _ragged_axis(spec)
                longest = -(-max(a.shape[axis] for a in arrays) // bucket) * bucket
                arrays = [_pad(a, axis, longest, spec.pad_value) for a in arrays]
            merged[spec.name] = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
        return merged

    def split(self, outputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Each request's own rows of every output, cast to the declared datatype."""
        checked = {
            spec.name: self._check(spec, outputs)
            for spec in self.config.outputs
            if self.wanted is None or spec.name in self.wanted
        }
        results: list[dict[str, np.ndarray]] = []
        for request, rows in zip(self.requests, self.slices, strict=True):
            own: dict[str, np.ndarray] = {}
            for spec in self.config.outputs:
                if request.requested_outputs and spec.name not in request.requested_outputs:
                    continue
                array = checked[spec.name]
                if self.config.batched:
                    array = array[rows.start : rows.stop]
                    if spec.ragged and rows.length:
                        index = [slice(None)] * array.ndim
                        index[_ragged_axis(spec)] = slice(0, rows.length)
                        array = array[tuple(index)]
                own[spec.name] = array
            results.append(own)
        return results

    def _check(self, spec: TensorSpec, outputs: dict[str, np.ndarray]) -> np.ndarray:
        name = self.config.name
        if spec.name not in outputs:
            raise InternalError(f"model '{name}' returned no output '{spec.name}' (got {sorted(outputs)})")
        array = np.asarray(outputs[spec.name])
        if self.config.batched and (array.ndim == 0 or array.shape[0] != self.rows):
            got = array.shape[0] if array.ndim else "a scalar"
            raise InternalError(
                f"model '{name}' output '{spec.name}' has {got} rows for a batch of {self.rows}"
            )
        return _as_datatype(array, spec.datatype)


def _as_datatype(array: np.ndarray, datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        return array if array.dtype == object else array.astype(object)
    if datatype == "BF16":  # raw bf16 words (uint16) pass as they are; numbers are rounded to them
        return array if array.dtype == np.uint16 else float32_to_bf16_words(array.astype(np.float32))
    dtype = NUMPY_DTYPES[datatype]
    return array if array.dtype == dtype else array.astype(dtype)
