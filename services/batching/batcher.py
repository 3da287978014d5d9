"""The dynamic batcher: one per model, wrapping the backend's predict.

Requests wait in a bounded queue. When the device is free, the batcher takes the oldest
request and adds others (by arrival, or by nearest length under a token budget) up to
the row limit, waiting at most `max_queue_delay_ms` for company. The batch runs on the
model's single worker thread; each caller gets its own rows back. Out-of-memory halves
the batch and retries; a failing batch is rerun request by request so a bad row fails alone.

While a batch runs, the next one is formed and queued on the worker as soon as the waiting
requests fill it, so the device starts it the moment the first ends: no event-loop round
trip between batches (a few ms per batch on a loaded host, 4-5 % of a 128 ms batch).
A batch that is not full yet still waits for the device, where it can gather more company.

On a device that can take a batch's inputs ahead of time (a torch backend on CUDA:
`Backend.can_stage`), a second thread merges the queued batch and starts its copies to the
device as soon as it is handed over, while the model thread is still computing the one before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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

# batches handed to the model thread at once: one running, one formed and waiting behind it
PIPELINE_DEPTH = 2


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
class _Pending:
    request: DecodedRequest
    future: asyncio.Future
    enqueued_ns: int = field(default_factory=time.monotonic_ns)


@dataclass
class _Batch:
    pending: list[_Pending]
    work: Future | None = None  # the model thread's item, once handed over


class DynamicBatcher:
    """Batches requests for one model. `submit` is the only entry point callers need."""

    def __init__(
        self,
        config: ModelConfig,
        predict: Predict,
        stats: ModelStats | None = None,
        on_batch: Callable[[int, float, float], None] | None = None,
        worker: ThreadPoolExecutor | None = None,
        device_stages: Callable[[], dict[str, int]] | None = None,
        staging: Staging | None = None,
        on_device_lost: Callable[[BaseException], None] | None = None,
    ) -> None:
        """`worker`: the model's own thread, the one that loaded it (services/model_runtime.py);
        the batcher then leaves it running when closed. Without one it makes and owns a thread.
        `on_device_lost(error)`: called, from the model thread, when the device itself failed."""
        self.config = config
        self.policy = config.batching
        self._predict = predict
        self.stats = stats or ModelStats()
        self._on_batch = on_batch  # (rows, queue seconds, compute seconds) for metrics
        self._device_stages = device_stages  # the backend's h2d / compute / d2h of its last predict
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()  # a request arrived or a batch finished
        self._owns_worker = worker is None
        self._worker = worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{config.name}")
        self._staging = staging
        self._on_device_lost = on_device_lost
        self._feeder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"feed-{config.name}") if staging else None
        self._loop_task: asyncio.Task | None = None
        self._batches: dict[asyncio.Task, _Batch] = {}  # handed to the worker, not yet answered
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
        if self._owns_worker:
            self._worker.shutdown(wait=False, cancel_futures=True)
        else:  # the thread stays the model's: cancel only this batcher's batches still waiting on it
            for batch in self._batches.values():
                if batch.work is not None:
                    batch.work.cancel()
        if self._feeder is not None:
            self._feeder.shutdown(wait=False, cancel_futures=True)
        # a batch still waiting behind the running one will never run: answer its callers
        for task, batch in list(self._batches.items()):
            if batch.work is not None and batch.work.cancelled():
                for pending in batch.pending:
                    if not pending.future.done():
                        pending.future.set_exception(Unavailable(f"model '{self.config.name}' was unloaded"))
                task.cancel()

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
        self._wake.set()
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
            if not self._can_start():
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._batches:  # the device is free: give the oldest request some company
                await self._wait_for_company()
            if self._queue:
                self._start(self._take_batch())

    def _can_start(self) -> bool:
        """A batch may be formed now: the device is free, or the waiting requests fill one."""
        if not self._queue or len(self._batches) >= PIPELINE_DEPTH:
            return False
        return not self._batches or self._full_batch_waiting()

    async def _wait_for_company(self) -> None:
        """Wait until the batch is full or the oldest request has waited max_queue_delay."""
        deadline = self._queue[0].enqueued_ns + int(self.policy.max_queue_delay_ms * 1e6)
        while self._queue and not self._full_batch_waiting():
            remaining = (deadline - time.monotonic_ns()) / 1e9
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _full_batch_waiting(self) -> bool:
        """The oldest request with the others it may merge with fill a batch (rows or tokens)."""
        oldest = self._queue[0]
        if oldest.request.exclusive or not self.config.batched:
            return True
        enough = min(max([self.config.max_batch_size, *self.policy.preferred_batch_sizes]),
                     self.config.max_batch_size)
        mergeable = [p.request for p in self._queue if self._mergeable(oldest.request, p.request)]
        if sum(r.rows for r in mergeable) >= enough:
            return True
        budget = self.policy.token_budget
        return bool(budget) and sum(r.rows * self._bucket(r) for r in mergeable) >= budget

    @staticmethod
    def _mergeable(oldest: DecodedRequest, other: DecodedRequest) -> bool:
        """Requests share a batch only with the same stored context and the same parameters:
        the model runs a batch with one context and one set of parameters."""
        return not other.exclusive and other.context == oldest.context and other.parameters == oldest.parameters

    def _start(self, pending: list[_Pending]) -> None:
        batch = _Batch(pending)
        task = asyncio.get_running_loop().create_task(self._execute(batch))
        self._batches[task] = batch
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._batches.pop(task, None)
        self._wake.set()

    def _bucket(self, request: DecodedRequest) -> int:
        width = self.policy.length_bucket
        return -(-request.length // width) * width

    def _take_batch(self) -> list[_Pending]:
        oldest = self._queue.popleft()
        if oldest.request.exclusive or not self.config.batched:
            return [oldest]
        chosen = [oldest]
        rows, longest = oldest.request.rows, self._bucket(oldest.request)
        candidates = [p for p in self._queue if self._mergeable(oldest.request, p.request)]
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

    async def _execute(self, batch: _Batch) -> None:
        pending = [p for p in batch.pending if not p.future.cancelled()]
        if not pending:
            return
        try:
            results, started = await self._on_worker(batch, [p.request for p in pending])
        except Exception as error:  # the worker returns errors per request; this is a bug guard
            log.exception("batch for model %s failed outside the model", self.config.name)
            results = [InternalError(f"model '{self.config.name}': {type(error).__name__}: {error}")] * len(pending)
            started = time.monotonic_ns()
        done = time.monotonic_ns()
        queue_ns = [max(started - p.enqueued_ns, 0) for p in pending]
        rows = sum(p.request.rows for p in pending)
        if self._on_batch:
            self._on_batch(rows, sum(queue_ns) / len(pending) / 1e9, (done - started) / 1e9)
        for item, result, waited in zip(pending, results, queue_ns, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                self.stats.record_request(True, done - item.enqueued_ns, waited)
                item.future.set_result(result)

    def _on_worker(self, batch: _Batch, requests: list[DecodedRequest]) -> asyncio.Future:
        """`_run_batch` on the model thread; (outcome, start time) set on a plain asyncio future.

        Half the event-loop CPU of `run_in_executor`'s chained futures, paid on every batch.
        The start time is taken on the thread: a batch may wait there behind the one running."""
        loop = asyncio.get_running_loop()
        outcome = loop.create_future()
        # merge and copy now, while the model thread may still be computing the batch before
        # (a batch with request parameters runs unstaged: predict_staged takes none)
        staged = self._feeder is not None and not requests[0].parameters
        prepared = self._feeder.submit(self._prepare, requests) if staged else None

        def run() -> None:
            started = time.monotonic_ns()
            try:
                result, error = (self._run_batch(requests, prepared), started), None
            except Exception as caught:  # handed to the loop, where _execute reports it
                result, error = None, caught
            loop.call_soon_threadsafe(_settle, outcome, result, error)

        batch.work = self._worker.submit(run)
        return outcome

    # --- on the feeder thread -------------------------------------------------------
    def _prepare(self, requests: list[DecodedRequest]) -> _Prepared:
        assembly = BatchAssembly(self.config, requests)
        t0 = time.monotonic_ns()
        merged = assembly.merge()
        merge_ns = time.monotonic_ns() - t0
        context = requests[0].context_inputs
        assert self._staging is not None
        staged = self._staging.stage({**merged, **context} if context else merged)
        return _Prepared(assembly, merged, staged, merge_ns)

    # --- on the worker thread -------------------------------------------------------
    def _run_batch(
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
        if self._on_device_lost is not None:
            self._on_device_lost(error)
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
        assembly, staging = ready.assembly, self._staging
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
            device = self._device_stages() if self._device_stages else {}
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
            outputs = self._predict(feed, **extra)
            device = self._device_stages() if self._device_stages else None
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
