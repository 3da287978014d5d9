"""A CPU server process runs its models on the main thread, and its event loop on another.

Why the main thread: glibc gives it the main arena, whose heap (brk) keeps freed blocks of any
size up to allocator.py's M_MMAP_THRESHOLD. Every other thread gets an arena made of heaps of at
most 64 MiB, so a model thread's larger blocks (the attention scores of a 6 x 320 encoder's
batch of 64 sorted proteins: hundreds of MiB) were mmapped and faulted in afresh on every batch,
while the in-process loop, on its main thread, kept them (allocator.py has the figures).

`MainThreadWorker` is the executor the models get in place of their own threads
(services/model_runtime.py): `submit` queues, `run` executes on the main thread until
`shutdown`. `run_beside_loop` runs the server's coroutine in an event loop on a second thread
while the main thread works, and forwards SIGTERM and SIGINT to it (an event loop can install
signal handlers only on the main thread). Only the process entry point uses it
(server.serve_process); a server built inside another program keeps per-model threads.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import queue
import signal
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")

#: Signals that drain the server, as `core.grpc_server.stop_on_signals` does on the main thread.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: How long the idle main thread sleeps between looks at its signal flags. Linux hands a
#: process-directed signal to the main thread when it is waiting, which interrupts the wait and
#: runs the Python handler at once; this bounds the delay if one lands on another thread.
IDLE_WAKE_S = 0.5

#: The loop thread's name, to the kernel too (/proc/PID/task/TID/comm, top -H, perf), so that
#: tools tell it from the main thread (bench/server_passes.py's event-loop CPU per request).
LOOP_THREAD_NAME = "event-loop"

_STOP = object()  # the queue's last item


def name_this_thread(name: str) -> None:
    """Give the calling thread `name` in the kernel as well (Linux; elsewhere nothing)."""
    library = ctypes.util.find_library("c")
    prctl = getattr(ctypes.CDLL(library), "prctl", None) if library else None
    if prctl is not None:
        prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


class MainThreadWorker(Executor):
    """An executor whose work runs on the thread that calls `run` (the main thread), in order.

    Like a one-thread ThreadPoolExecutor to its callers: a function's exception (BaseException
    too) goes to its future, a cancelled future's function never runs, and `submit` after
    `shutdown` raises RuntimeError."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._shutdown = False
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._running_on: threading.Thread | None = None
        #: The serving loop and its stop function, once the server asked for signals.
        self._stop: tuple[asyncio.AbstractEventLoop, Callable[[], None]] | None = None

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future[T] = Future()
            self._queue.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """`run` returns once the work queued before this is done (cancelled, with cancel_futures)."""
        with self._lock:
            if not self._shutdown:
                self._shutdown = True
                if cancel_futures:
                    self._cancel_queued()
                self._queue.put(_STOP)
        if wait and self._running_on is not None and self._running_on is not threading.current_thread():
            self._finished.wait()

    def _cancel_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[0].cancel()

    def run(self) -> None:
        """Execute submitted work on this thread until `shutdown`."""
        self._running_on = threading.current_thread()
        try:
            while True:
                try:
                    item = self._queue.get(timeout=IDLE_WAKE_S)
                except queue.Empty:
                    continue  # a signal's Python handler runs here, between two waits
                if item is _STOP:
                    return
                self._run_one(*item)
                del item  # a batch's inputs are freed now, not when the next one arrives
        finally:
            self._finished.set()

    @staticmethod
    def _run_one(future: Future, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - the caller's, as ThreadPoolExecutor does
            future.set_exception(error)
        else:
            future.set_result(result)

    def run_beside_loop(self, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """`asyncio.run(main())` on a second thread while this (main) thread runs the work.

        Returns what `main` returned, or raises what it raised, once the loop thread ended and
        the work it left queued ran. SIGTERM and SIGINT go to the stop function the coroutine
        gives `stop_on_signals` (before that, while the server starts, they end the process
        at once, as with no handler). Call it on the main thread."""
        outcome: dict[str, Any] = {}

        def loop_thread() -> None:
            name_this_thread(LOOP_THREAD_NAME)
            try:
                outcome["result"] = asyncio.run(main())
            except BaseException as error:  # noqa: BLE001 - raised again on the main thread
                outcome["error"] = error
            finally:
                self.shutdown(wait=False)

        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        # a daemon only so that a failure of this thread before the server serves cannot hang the
        # process's exit; otherwise it is always joined
        thread = threading.Thread(target=loop_thread, name=LOOP_THREAD_NAME, daemon=True)
        thread.start()
        try:
            self.run()
        except BaseException:
            if self._request_stop():  # the server drains and its thread ends
                thread.join()
            raise
        else:
            thread.join()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if "error" in outcome:
            raise outcome.pop("error")
        return outcome["result"]

    # --- signals ---------------------------------------------------------------------
    def stop_on_signals(self, stop: Callable[[], None]) -> None:
        """From the loop thread: SIGTERM and SIGINT call `stop` on the running loop from now on."""
        self._stop = (asyncio.get_running_loop(), stop)

    def _on_signal(self, signum: int, frame: object) -> None:
        """On the main thread, between two bytecodes of whatever it runs: only a hand-over."""
        if self._stop is None:  # not serving yet: what the signal does to a process without a handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._request_stop()

    def _request_stop(self) -> bool:
        """Ask the serving loop to stop; False when no server asked for signals yet."""
        if self._stop is None:
            return False
        loop, stop = self._stop
        try:
            loop.call_soon_threadsafe(stop)
        except RuntimeError:  # the loop already closed: the process is on its way out
            pass
        return True
