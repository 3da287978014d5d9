"""The dynamic batcher: one per model, wrapping the backend's predict.

Requests wait in a bounded queue. When the device is free, the batcher takes the oldest
request and adds others (by arrival, or by nearest length under a token budget) up to
the row limit, waiting at most `max_queue_delay_ms` for company. The batch runs on the
model's single worker thread; each caller gets its own rows back. Out-of-memory halves
the batch and retries; a failing batch is rerun request by request so a bad row fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tensorfleet.client.errors import (
    InternalError,
    ResourceExhausted,
    TensorfleetError,
    Unavailable,
)

from .backends.base import is_out_of_memory
from .batch_assembly import BatchAssembly
from .model_config import ModelConfig
from .statistics import ModelStats
from .validation import DecodedRequest

log = logging.getLogger("tensorfleet.batcher")

Predict = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
Outputs = dict[str, np.ndarray]


@dataclass
class _Pending:
    request: DecodedRequest
    future: asyncio.Future
    enqueued_ns: int = field(default_factory=time.monotonic_ns)


class DynamicBatcher:
    """Batches requests for one model. `submit` is the only entry point callers need."""

    def __init__(
        self,
        config: ModelConfig,
        predict: Predict,
        stats: ModelStats | None = None,
        on_batch: Callable[[int, float, float], None] | None = None,
    ) -> None:
        self.config = config
        self.policy = config.batching
        self._predict = predict
        self.stats = stats or ModelStats()
        self._on_batch = on_batch  # (rows, queue seconds, compute seconds) for metrics
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{config.name}")
        self._loop_task: asyncio.Task | None = None
        self._closed = False
        self.in_flight = 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.config.name}")

    async def close(self) -> None:
        """Stop taking requests, fail the queued ones, release the worker thread."""
        self._closed = True
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"model '{self.config.name}' was unloaded"))
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def submit(self, request: DecodedRequest) -> Outputs:
        """Queue one validated request and wait for its own outputs."""
        if self._closed:
            raise Unavailable(f"model '{self.config.name}' is not serving")
        if len(self._queue) >= self.policy.max_queue_size:
            raise ResourceExhausted(
                f"model '{self.config.name}' queue is full ({self.policy.max_queue_size} requests waiting); retry later"
            )
        self.start()
        pending = _Pending(request, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._arrived.set()
        self.in_flight += 1
        started = pending.enqueued_ns
        try:
            result = await pending.future
        except BaseException:
            self.stats.record_request(False, time.monotonic_ns() - started, 0)
            raise
        finally:
            self.in_flight -= 1
        return result

    # --- the loop -----------------------------------------------------------------
    async def _run(self) -> None:
        while not self._closed:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._wait_for_company()
            batch = self._take_batch()
            if batch:
                await self._execute(batch)

    async def _wait_for_company(self) -> None:
        """Wait until the batch is full or the oldest request has waited max_queue_delay."""
        oldest = self._queue[0]
        if oldest.request.exclusive or not self.config.batched:
            return
        enough = max([self.config.max_batch_size, *self.policy.preferred_batch_sizes])
        enough = min(enough, self.config.max_batch_size)
        deadline = oldest.enqueued_ns + int(self.policy.max_queue_delay_ms * 1e6)
        while self._mergeable_rows() < enough:
            remaining = (deadline - time.monotonic_ns()) / 1e9
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _mergeable_rows(self) -> int:
        return sum(p.request.rows for p in self._queue if not p.request.exclusive)

    def _bucket(self, request: DecodedRequest) -> int:
        width = self.policy.length_bucket
        return -(-request.length // width) * width

    def _take_batch(self) -> list[_Pending]:
        oldest = self._queue.popleft()
        if oldest.request.exclusive or not self.config.batched:
            return [oldest]
        chosen = [oldest]
        rows, longest = oldest.request.rows, self._bucket(oldest.request)
        # never merge requests that use different stored contexts
        candidates = [p for p in self._queue if not p.request.exclusive and p.request.context == oldest.request.context]
        if self.policy.token_budget:
            # group by length: nearest length bucket first, then arrival order
            candidates.sort(key=lambda p: abs(self._bucket(p.request) - longest))
        limit = self._row_limit(oldest.request.rows + sum(p.request.rows for p in candidates))
        for pending in candidates:
            if rows + pending.request.rows > limit:
                continue
            padded = max(longest, self._bucket(pending.request))
            if self.policy.token_budget and (rows + pending.request.rows) * padded > self.policy.token_budget:
                continue
            chosen.append(pending)
            rows += pending.request.rows
            longest = padded
            if rows == limit:
                break
        taken = {id(p) for p in chosen[1:]}
        self._queue = deque(p for p in self._queue if id(p) not in taken)
        return chosen

    def _row_limit(self, available: int) -> int:
        """max_batch_size, or the largest preferred size the waiting rows can fill."""
        preferred = sorted(size for size in self.policy.preferred_batch_sizes if size <= self.config.max_batch_size)
        fillable = [size for size in preferred if size <= available]
        if preferred and fillable and available < self.config.max_batch_size:
            return fillable[-1]
        return self.config.max_batch_size

    async def _execute(self, batch: list[_Pending]) -> None:
        batch = [p for p in batch if not p.future.cancelled()]
        if not batch:
            return
        started = time.monotonic_ns()
        queue_ns = [started - p.enqueued_ns for p in batch]
        try:
            results = await self._on_worker([p.request for p in batch])
        except Exception as error:  # the worker returns errors per request; this is a bug guard
            log.exception("batch for model %s failed outside the model", self.config.name)
            results = [InternalError(f"model '{self.config.name}': {type(error).__name__}: {error}")] * len(batch)
        done = time.monotonic_ns()
        rows = sum(p.request.rows for p in batch)
        if self._on_batch:
            self._on_batch(rows, sum(queue_ns) / len(batch) / 1e9, (done - started) / 1e9)
        for pending, result, waited in zip(batch, results, queue_ns, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                self.stats.record_request(True, done - pending.enqueued_ns, waited)
                pending.future.set_result(result)

    def _on_worker(self, requests: list[DecodedRequest]) -> asyncio.Future:
        """`_run_batch` on the model thread, its outcome set on a plain asyncio future.

        Half the event-loop CPU of `run_in_executor`'s chained futures, paid on every batch."""
        loop = asyncio.get_running_loop()
        outcome = loop.create_future()

        def run() -> None:
            try:
                result, error = self._run_batch(requests), None
            except Exception as caught:  # handed to the loop, where _execute reports it
                result, error = None, caught
            loop.call_soon_threadsafe(_settle, outcome, result, error)

        self._worker.submit(run)
        return outcome

    # --- on the worker thread -------------------------------------------------------
    def _run_batch(self, requests: list[DecodedRequest]) -> list[Outputs | TensorfleetError]:
        """Run merged; if that fails (not for memory), rerun each request alone."""
        try:
            return self._run_merged(requests)
        except TensorfleetError as error:
            if len(requests) == 1:
                return [error]
        except Exception as error:
            if len(requests) == 1:
                return [self._model_error(error)]
            log.warning("batch of %d requests for %s failed (%s); retrying one by one",
                        len(requests), self.config.name, error)
        results: list[Outputs | TensorfleetError] = []
        for request in requests:
            try:
                results.extend(self._run_merged([request]))
            except TensorfleetError as error:
                results.append(error)
            except Exception as error:
                results.append(self._model_error(error))
        return results

    def _run_merged(self, requests: list[DecodedRequest]) -> list[Outputs]:
        assembly = BatchAssembly(self.config, requests)
        t0 = time.monotonic_ns()
        merged = assembly.merge()
        t1 = time.monotonic_ns()
        outputs = self._predict_halving(merged, assembly.rows, requests[0].context_inputs)
        t2 = time.monotonic_ns()
        split = assembly.split(outputs)
        t3 = time.monotonic_ns()
        self.stats.record_io(t1 - t0, t3 - t2)
        return split

    def _predict_halving(self, inputs: dict[str, np.ndarray], rows: int, context: dict | None = None) -> Outputs:
        """Out of memory: run the two halves separately and join them, down to one row.

        `context` (a stored prompt) goes whole with every half: it is not rows of this batch."""
        started = time.monotonic_ns()
        try:
            outputs = self._predict({**inputs, **context} if context else inputs)
            self.stats.record_execution(rows, time.monotonic_ns() - started)
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
        first = self._predict_halving({k: v[:half] for k, v in inputs.items()}, half, context)
        second = self._predict_halving({k: v[half:] for k, v in inputs.items()}, rows - half, context)
        return {name: _join(first[name], second[name]) for name in first}

    def _model_error(self, error: Exception) -> TensorfleetError:
        log.warning("model %s raised %s: %s", self.config.name, type(error).__name__, error)
        return InternalError(f"model '{self.config.name}' failed: {type(error).__name__}: {error}")


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():  # cancelled while the batch ran (the batcher was closed)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _join(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Concatenate two halves; pad a ragged trailing axis when the halves padded differently."""
    if first.ndim > 1 and first.shape[1:] != second.shape[1:]:
        target = [max(a, b) for a, b in zip(first.shape[1:], second.shape[1:], strict=True)]
        first, second = (np.pad(x, [(0, 0)] + [(0, t - s) for t, s in zip(target, x.shape[1:], strict=True)])
                         for x in (first, second))
    return np.concatenate([first, second], axis=0)
