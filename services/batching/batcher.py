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

This module is the queue and the choice of each batch's requests (`_select`), the hand-over to
the model thread and the answers back on the loop (`_hand_over`, `_deliver`); how a batch runs
on that thread (the per-request rerun, out-of-memory halving, a lost device, staging) is
runner.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from tensorfleet.core.errors import InternalError, ResourceExhausted, TensorfleetError, Unavailable

from ..model_config import ModelConfig
from ..statistics import ModelStats
from ..validation import DecodedRequest
from .runner import BatchRunner, Outputs, Predict, Staging

__all__ = ["PIPELINE_DEPTH", "DynamicBatcher", "Outputs", "Predict", "Staging"]

log = logging.getLogger("tensorfleet.batcher")

# batches handed to the model thread at once: one running, one formed and waiting behind it
PIPELINE_DEPTH = 2


@dataclass
class _Pending:
    request: DecodedRequest
    future: asyncio.Future
    enqueued_ns: int = field(default_factory=time.monotonic_ns)


@dataclass(eq=False)
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
        worker: Executor | None = None,
        device_stages: Callable[[], dict[str, int]] | None = None,
        staging: Staging | None = None,
        on_device_lost: Callable[[BaseException], None] | None = None,
    ) -> None:
        """`worker`: the model's own thread, the one that loaded it (services/model_runtime.py;
        in a CPU server process the main thread, shared by its models); the batcher then leaves
        it running when closed. Without one it makes and owns a thread.
        `on_device_lost(error)`: called, from the model thread, when the device itself failed."""
        self.config = config
        self.policy = config.batching
        self.stats = stats or ModelStats()
        self._on_batch = on_batch  # (rows, queue seconds, compute seconds) for metrics
        self._runner = BatchRunner(config, predict, self.stats, device_stages, staging, on_device_lost)
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()  # a request arrived or a batch finished
        self._owns_worker = worker is None
        self._worker: Executor = worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{config.name}")
        self._feeder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"feed-{config.name}") if staging else None
        self._loop_task: asyncio.Task | None = None
        self._batches: list[_Batch] = []  # handed to the worker, not yet answered
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
            for batch in self._batches:
                if batch.work is not None:
                    batch.work.cancel()
        if self._feeder is not None:
            self._feeder.shutdown(wait=False, cancel_futures=True)
        # a batch still waiting behind the running one will never run: answer its callers
        for batch in list(self._batches):
            if batch.work is not None and batch.work.cancelled():
                for pending in batch.pending:
                    if not pending.future.done():
                        pending.future.set_exception(Unavailable(f"model '{self.config.name}' was unloaded"))
                self._batches.remove(batch)

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
        """The batch the oldest request would start now is full: nothing more can join it.

        That is: it reached max_batch_size rows, or a waiting request it may merge with was left
        out (rows or tokens would overflow: that one goes in the next batch), or under a token
        budget not even one more row fits (a row is padded to the batch's longest, so it adds
        at least that many tokens). Waiting longer could not make such a batch bigger, so it
        goes at once: to an idle device without max_queue_delay_ms, or behind the running one."""
        oldest = self._queue[0]
        if oldest.request.exclusive or not self.config.batched:
            return True
        _, rows, longest, left_out = self._select(self.config.max_batch_size)
        if rows >= self.config.max_batch_size or left_out:
            return True
        budget = self.policy.token_budget
        return bool(budget) and (rows + 1) * longest > budget

    @staticmethod
    def _mergeable(oldest: DecodedRequest, other: DecodedRequest) -> bool:
        """Requests share a batch only with the same stored context and the same parameters:
        the model runs a batch with one context and one set of parameters."""
        return not other.exclusive and other.context == oldest.context and other.parameters == oldest.parameters

    def _start(self, pending: list[_Pending]) -> None:
        """Hand a batch to the model thread; its answers come back in one loop callback."""
        pending = [p for p in pending if not p.future.cancelled()]
        if not pending:
            return
        batch = _Batch(pending)
        self._batches.append(batch)
        self._hand_over(batch, [p.request for p in pending])

    def _bucket(self, request: DecodedRequest) -> int:
        width = self.policy.length_bucket
        return -(-request.length // width) * width

    def _take_batch(self) -> list[_Pending]:
        oldest = self._queue[0]
        if oldest.request.exclusive or not self.config.batched:
            return [self._queue.popleft()]
        chosen = self._select()[0]
        if len(chosen) == 1:
            return [self._queue.popleft()]
        taken = {id(p) for p in chosen}
        self._queue = deque(p for p in self._queue if id(p) not in taken)
        return chosen

    def _select(self, limit: int | None = None) -> tuple[list[_Pending], int, int, bool]:
        """The batch the oldest request would start now, without taking it from the queue:
        (its requests, rows, padded length, whether a mergeable request was left out).
        Rows stop at `limit`, by default max_batch_size or a preferred size (`_row_limit`)."""
        oldest = self._queue[0]
        chosen = [oldest]
        rows, longest = oldest.request.rows, self._bucket(oldest.request)
        candidates = [p for p in list(self._queue)[1:] if self._mergeable(oldest.request, p.request)]
        if self.policy.token_budget:
            # group by length: nearest length bucket first, then arrival order
            candidates.sort(key=lambda p: abs(self._bucket(p.request) - longest))
        if limit is None:
            limit = self._row_limit(oldest.request.rows + sum(p.request.rows for p in candidates))
        left_out = False
        for index, pending in enumerate(candidates):
            if rows + pending.request.rows > limit:
                left_out = True
                continue
            padded = max(longest, self._bucket(pending.request))
            if self.policy.token_budget and (rows + pending.request.rows) * padded > self.policy.token_budget:
                left_out = True
                continue
            chosen.append(pending)
            rows += pending.request.rows
            longest = padded
            if rows == limit:
                left_out = left_out or index + 1 < len(candidates)
                break
        return chosen, rows, longest, left_out

    def _row_limit(self, available: int) -> int:
        """max_batch_size, or the largest preferred size the waiting rows can fill."""
        preferred = sorted(size for size in self.policy.preferred_batch_sizes if size <= self.config.max_batch_size)
        fillable = [size for size in preferred if size <= available]
        if preferred and fillable and available < self.config.max_batch_size:
            return fillable[-1]
        return self.config.max_batch_size

    def _hand_over(self, batch: _Batch, requests: list[DecodedRequest]) -> None:
        """`BatchRunner.run_batch` on the model thread, then `_deliver` on the loop: one wake-up per batch.

        No task and no future per batch (a task to await the worker cost two loop steps and a
        future chain on every batch). The start time is taken on the thread: a batch may wait
        there behind the one running."""
        loop = asyncio.get_running_loop()
        # merge and copy now, while the model thread may still be computing the batch before
        # (a batch with request parameters runs unstaged: predict_staged takes none)
        staged = self._feeder is not None and not requests[0].parameters
        prepared = self._feeder.submit(self._runner.prepare, requests) if staged else None

        def run() -> None:
            started = time.monotonic_ns()
            try:
                results: list[Outputs | TensorfleetError] | Exception = self._runner.run_batch(requests, prepared)
            except Exception as caught:  # handed to the loop, where _deliver reports it
                results = caught
            loop.call_soon_threadsafe(self._deliver, batch, results, started)

        batch.work = self._worker.submit(run)

    def _deliver(self, batch: _Batch, results: list[Outputs | TensorfleetError] | Exception, started: int) -> None:
        """On the loop: answer every request of a finished batch, in this one callback."""
        if batch in self._batches:
            self._batches.remove(batch)
        self._wake.set()
        pending = batch.pending
        if isinstance(results, Exception):  # the worker returns errors per request; this is a bug guard
            log.error("batch for model %s failed outside the model", self.config.name, exc_info=results)
            results = [InternalError(f"model '{self.config.name}': {type(results).__name__}: {results}")] * len(pending)
        done = time.monotonic_ns()
        queue_ns = [max(started - p.enqueued_ns, 0) for p in pending]
        if self._on_batch:
            rows = sum(p.request.rows for p in pending)
            self._on_batch(rows, sum(queue_ns) / len(pending) / 1e9, (done - started) / 1e9)
        for item, result, waited in zip(pending, results, queue_ns, strict=True):
            if item.future.done():  # cancelled while the batch ran, or answered by close()
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                self.stats.record_request(True, done - item.enqueued_ns, waited)
                item.future.set_result(result)
