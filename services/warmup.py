"""Warm-up batches of the common (rows x padded length) shapes, run before SERVING.

A GPU pays once per new input shape (kernel selection, allocator growth: 50-60 ms per shape
measured on an H100), so the first batches of each common shape would be slow. The model's
config names those shapes (`batching.warmup_shapes`); each batch is built from the first
`warmup` example: its rows repeated, and every ragged input (BYTES too) repeated along its
variable axis to the shape's length.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .backends.base import Backend
from .model_config import ModelConfig
from .validation import example_inputs

log = logging.getLogger("tensorfleet.warmup")


def _stretch(row: np.ndarray, axis: int, length: int) -> np.ndarray:
    """The row's values repeated (cyclically) along `axis` to exactly `length`."""
    index = np.arange(length) % max(row.shape[axis], 1)
    return np.take(row, index, axis=axis)


def shape_inputs(config: ModelConfig, rows: int, length: int) -> dict[str, np.ndarray]:
    """One batch of `rows` rows whose ragged inputs are `length` long."""
    one = example_inputs(config, config.warmup[0])
    batch: dict[str, np.ndarray] = {}
    for spec in config.inputs:
        if spec.name not in one:
            continue
        array = one[spec.name]
        if spec.ragged and spec.datatype == "BYTES":
            text = array.reshape(-1)[0]
            text = text if isinstance(text, bytes) else str(text).encode()
            array = np.array([(text * (length // max(len(text), 1) + 1))[:length]], dtype=object).reshape(array.shape)
        elif spec.ragged:
            array = _stretch(array, spec.shape.index(-1) + 1, length)
        batch[spec.name] = np.repeat(array, rows, axis=0)
    return batch


def warm_shapes(config: ModelConfig, backend: Backend) -> int:
    """Run every configured shape once; the number run."""
    shapes = config.batching.warmup_shapes
    if not shapes:
        return 0
    started = time.monotonic()
    for rows, length in shapes:
        backend.predict(shape_inputs(config, rows, length))
    log.info("model %s: warmed %d batch shapes in %.2fs", config.name, len(shapes), time.monotonic() - started)
    return len(shapes)
