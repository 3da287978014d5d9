"""A served model: its repository entry, its batcher and its statistics, together.

Each model has one thread for life: it loads the model, warms it up and runs every batch.
Loading on one thread and running on another cost 22-26 % of a small model's speed on CPU
(torch's OpenMP team belongs to the thread that warmed it: ~13,600 voluntary context
switches per pass instead of <= 10), so the batcher runs on the thread that loaded.

A CPU server process gives every model the same one, its main thread (`shared_worker`, a
main_thread.MainThreadWorker: only that thread's malloc arena keeps blocks over 64 MiB across
batches); the models then load, and run their batches, one after another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

from tensorfleet.core.errors import FailedPrecondition

from .batching.batcher import DynamicBatcher
from .metrics import ServerMetrics
from .repository.repository import ModelEntry, ModelRepository, ModelState
from .statistics import ModelStats


@dataclass
class ServedModel:
    entry: ModelEntry
    batcher: DynamicBatcher
    stats: ModelStats


class ModelRuntime:
    """Keeps one batcher per READY model in step with the repository's loads and unloads."""

    def __init__(self, repository: ModelRepository, metrics: ServerMetrics, shared_worker: Executor | None = None) -> None:
        """`shared_worker`: the one worker of every model, owned (and shut down) by the caller."""
        self.repository = repository
        self.metrics = metrics
        self.shared_worker = shared_worker
        self._served: dict[str, ServedModel] = {}
        self._stats: dict[str, ModelStats] = {}
        self._threads: dict[str, ThreadPoolExecutor] = {}
        self.draining = False
        #: Called from a model thread when the device itself failed (the server stops).
        self.on_device_lost: Callable[[BaseException], None] | None = None

    def model_thread(self, name: str) -> Executor:
        """The one thread that loads, warms, runs and unloads model `name`."""
        if self.shared_worker is not None:
            return self.shared_worker
        thread = self._threads.get(name)
        if thread is None:
            thread = self._threads[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        return thread

    def stats(self, name: str) -> ModelStats:
        stats = self._stats.get(name)  # called per request: no ModelStats built to be thrown away
        if stats is None:
            stats = self._stats[name] = ModelStats()
        return stats

    def served(self, name: str, version: str = "") -> ServedModel:
        """The batcher of a READY model (NotFound / FailedPrecondition otherwise)."""
        entry = self.repository.ready(name, version)
        current = self._served.get(name)
        if current is None or current.entry.backend is not entry.backend:
            if current is not None:
                asyncio.ensure_future(current.batcher.close())
            assert entry.config is not None and entry.backend is not None
            stats = self.stats(name)
            batcher = DynamicBatcher(
                entry.config,
                entry.backend.predict,
                stats,
                on_batch=self.metrics.batch_observer(name),
                worker=self.model_thread(name),
                device_stages=entry.backend.last_stages,
                staging=entry.backend if entry.backend.can_stage() else None,
                on_device_lost=self.on_device_lost,
            )
            current = self._served[name] = ServedModel(entry, batcher, stats)
        return current

    async def load(self, name: str) -> None:
        await self._drop(name)
        await asyncio.get_running_loop().run_in_executor(self.model_thread(name), self.repository.load, name)

    async def load_all(self) -> None:
        """Load every model, each on its own model thread (so several load at once; with a
        shared worker, one after another)."""
        names = [entry.name for entry in self.repository.entries()]
        await asyncio.gather(*(self._load_recorded(name) for name in names))

    async def _load_recorded(self, name: str) -> None:
        try:
            await self.load(name)
        except Exception:  # recorded on the entry (UNAVAILABLE with its reason); the others keep loading
            pass

    async def unload(self, name: str) -> None:
        entry = self.repository.entry(name)
        if entry.state is not ModelState.READY:
            raise FailedPrecondition(f"model '{name}' is {entry.state.value}, not loaded")
        await self._drop(name)
        await asyncio.get_running_loop().run_in_executor(self.model_thread(name), self.repository.unload, name)

    async def _drop(self, name: str) -> None:
        current = self._served.pop(name, None)
        if current is not None:
            await current.batcher.close()

    async def close(self) -> None:
        """Close every batcher and end the model threads once their current work is done."""
        for name in list(self._served):
            await self._drop(name)
        for thread in self._threads.values():
            thread.shutdown(wait=False, cancel_futures=True)

    def in_flight(self) -> int:
        return sum(s.batcher.in_flight for s in self._served.values())

    def queue_depth(self, name: str) -> int:
        current = self._served.get(name)
        return current.batcher.queue_depth if current else 0
