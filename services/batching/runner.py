"""How one batch runs on a model's thread: merged, or rerun request by request when a batch
fails so that a bad row fails alone; halved on out-of-memory down to one row; every request of
it answered UNAVAILABLE when the device itself failed. On a device that takes inputs ahead of
time (`Staging`), the feeder thread merges and copies the batch first (`prepare`).

The queue and the choice of requests for a batch are the batcher's (batcher.py); this module
never touches the event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tensorfleet.core.errors import (
    DEVICE_FAILED,
    InternalError,
    ResourceExhausted,
    TensorfleetError,
    Unavailable,
)

from ..backends.base import is_device_lost, is_out_of_memory
from ..model_config import ModelConfig
from ..statistics import ModelStats
from ..validation import DecodedRequest
from .assembly import BatchAssembly

log = logging.getLogger("tensorfleet.batcher")

# predict(inputs) or, when the batch's requests asked for only some outputs, predict(inputs,
# outputs=those names): a backend may then skip the others (no copy off the device)
Predict = Callable[..., dict[str, np.ndarray]]
Outputs = dict[str, np.ndarray]


class Staging(Protocol):
    """A backend that copies a batch's inputs to its device ahead of running it."""

    def stage(self, inputs: dict[str, np.ndarray]) -> Any: ...

    def predict_staged(self, staged: Any, outputs: frozenset[str] | None = None) -> Outputs: ...


@dataclass
class _Prepared:
    """A batch merged and copied to the device by the feeder thread."""

    assembly: BatchAssembly
    merged: dict[str, np.ndarray]
    staged: Any
    merge_ns: int


@dataclass
class BatchRunner:
    """Runs a model's batches (on its thread) and records their timings in `stats`."""

    config: ModelConfig
    predict: Predict
    stats: ModelStats
    #: The backend's h2d / compute / d2h of its last predict.
    device_stages: Callable[[], dict[str, int]] | None = None
    staging: Staging | None = None
    #: Called, from the model thread, when the device itself failed.
    on_device_lost: Callable[[BaseException], None] | None = None

    # --- on the feeder thread -------------------------------------------------------
    def prepare(self, requests: list[DecodedRequest]) -> _Prepared:
        assembly = BatchAssembly(self.config, requests)
        t0 = time.monotonic_ns()
        merged = assembly.merge()
        merge_ns = time.monotonic_ns() - t0
        context = requests[0].context_inputs
        assert self.staging is not None
        staged = self.staging.stage({**merged, **context} if context else merged)
        return _Prepared(assembly, merged, staged, merge_ns)

    # --- on the worker thread -------------------------------------------------------
    def run_batch(
        self, requests: list[DecodedRequest], prepared: Future | None = None
    ) -> list[Outputs | TensorfleetError]:
        """Run merged; if that fails (not for memory), rerun each request alone."""
        try:
            if prepared is not None:
                return self._run_prepared(requests, prepared)
            return self._run_merged(requests)
        except TensorfleetError as error:
            if len(requests) == 1:
                return [error]
        except Exception as error:
            if is_device_lost(error):  # no row's fault: every request fails over to another server
                return self._device_lost(requests, error)
            if len(requests) == 1:
                return [self._model_error(error)]
            log.warning("batch of %d requests for %s failed (%s); retrying one by one",
                        len(requests), self.config.name, error)
        results: list[Outputs | TensorfleetError] = []
        for index, request in enumerate(requests):
            try:
                results.extend(self._run_merged([request]))
            except TensorfleetError as error:
                results.append(error)
            except Exception as error:
                if is_device_lost(error):
                    return [*results, *self._device_lost(requests[index:], error)]
                results.append(self._model_error(error))
        return results

    def _device_lost(self, requests: list[DecodedRequest], error: Exception) -> list[TensorfleetError]:
        """The device failed: these requests get UNAVAILABLE (a client retries them elsewhere)
        and the server is told, so that it stops and can be started afresh."""
        log.error("model %s: the device failed: %s: %s", self.config.name, type(error).__name__, error)
        if self.on_device_lost is not None:
            self.on_device_lost(error)
        message = (f"model '{self.config.name}': {DEVICE_FAILED} ({type(error).__name__}: {error}); "
                   "this server is stopping so that it can be started afresh")
        return [Unavailable(message) for _ in requests]

    def _run_merged(self, requests: list[DecodedRequest]) -> list[Outputs]:
        assembly = BatchAssembly(self.config, requests)
        t0 = time.monotonic_ns()
        merged = assembly.merge()
        t1 = time.monotonic_ns()
        outputs = self._predict_halving(
            merged, assembly.rows, requests[0].context_inputs, assembly.wanted, requests[0].parameters
        )
        t2 = time.monotonic_ns()
        split = assembly.split(outputs)
        t3 = time.monotonic_ns()
        self.stats.record_io(t1 - t0, t3 - t2)
        return split

    def _run_prepared(self, requests: list[DecodedRequest], prepared: Future) -> list[Outputs]:
        """`_run_merged` on the feeder's merge and copies; out of memory: halve on the host."""
        try:
            ready: _Prepared = prepared.result()
        except Exception as error:  # the merge or the copy failed there: redo it here
            log.debug("model %s: staging failed (%s); running unstaged", self.config.name, error)
            return self._run_merged(requests)
        assembly, staging = ready.assembly, self.staging
        assert staging is not None
        started = time.monotonic_ns()
        try:
            outputs = staging.predict_staged(ready.staged, assembly.wanted)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            ready.staged = None  # free the device copies before halving
            outputs = self._predict_halving(
                ready.merged, assembly.rows, requests[0].context_inputs, assembly.wanted, requests[0].parameters
            )
        else:
            device = self.device_stages() if self.device_stages else {}
            # the copy ran on the feeder: count it as part of this predict, as unstaged
            self.stats.record_execution(assembly.rows, time.monotonic_ns() - started + device.get("h2d", 0), device)
        t2 = time.monotonic_ns()
        split = assembly.split(outputs)
        self.stats.record_io(ready.merge_ns, time.monotonic_ns() - t2)
        return split

    def _predict_halving(
        self, inputs: dict[str, np.ndarray], rows: int, context: dict | None = None,
        wanted: frozenset[str] | None = None, parameters: dict | None = None,
    ) -> Outputs:
        """Out of memory: run the two halves separately and join them, down to one row.

        `context` (a stored prompt) goes whole with every half: it is not rows of this batch."""
        started = time.monotonic_ns()
        feed = {**inputs, **context} if context else inputs
        try:
            extra: dict = {}
            if wanted is not None:
                extra["outputs"] = wanted
            if parameters:
                extra["parameters"] = parameters
            outputs = self.predict(feed, **extra)
            device = self.device_stages() if self.device_stages else None
            self.stats.record_execution(rows, time.monotonic_ns() - started, device)
            return outputs
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            if rows <= 1 or not self.config.batched:
                raise ResourceExhausted(
                    f"model '{self.config.name}' ran out of device memory on a single row: {error}"
                ) from error
            half = rows // 2
            log.warning("model %s: out of memory at %d rows; halving", self.config.name, rows)
        first = self._predict_halving({k: v[:half] for k, v in inputs.items()}, half, context, wanted, parameters)
        second = self._predict_halving({k: v[half:] for k, v in inputs.items()}, rows - half, context, wanted, parameters)
        return {name: _join(first[name], second[name]) for name in first}

    def _model_error(self, error: Exception) -> TensorfleetError:
        log.warning("model %s raised %s: %s", self.config.name, type(error).__name__, error)
        return InternalError(f"model '{self.config.name}' failed: {type(error).__name__}: {error}")


def _join(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Concatenate two halves; pad a ragged trailing axis when the halves padded differently."""
    if first.ndim > 1 and first.shape[1:] != second.shape[1:]:
        target = [max(a, b) for a, b in zip(first.shape[1:], second.shape[1:], strict=True)]
        first, second = (np.pad(x, [(0, 0)] + [(0, t - s) for t, s in zip(target, x.shape[1:], strict=True)])
                         for x in (first, second))
    return np.concatenate([first, second], axis=0)
