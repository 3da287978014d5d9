"""The real model server in this test process: for fast servicer and client tests.

`inprocess_server` builds the same ModelServer that `python -m tensorfleet.services` runs (grpc.aio
server, data plane, batchers, backends, interceptors) on 127.0.0.1 port 0, in a thread with its
own event loop, so sync clients (which block) and async clients (in the test's loop) both reach
it over real loopback gRPC. What it saves is the interpreter start, the imports and the port
file. Tests where signals, crashes or real start-up matter keep a subprocess (tests/serving.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorfleet.services.server import ModelServer, ServerOptions


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class InProcessServer:
    """A started server: its address, the ModelServer itself, and what it logged."""

    server: ModelServer
    port: int
    thread: threading.Thread
    captured: _Captured = field(repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        """Its event loop still runs (nothing it served stopped it)."""
        return self.thread.is_alive()

    def log(self) -> str:
        return "\n".join(self.captured.lines)


@contextlib.contextmanager
def inprocess_server(
    repository: Path | str, *models: str, timeout: float = 120.0, **options: Any
) -> Iterator[InProcessServer]:
    """Serve `models` (all in the repository when none) until the block ends, then drain and stop.

    `options` are ServerOptions fields (device, token, max_message_bytes, ...)."""
    started = threading.Event()
    state: dict[str, Any] = {}
    captured = _Captured()
    logger = logging.getLogger("tensorfleet")
    logger.addHandler(captured)
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)

    async def serve() -> None:
        settings = ServerOptions(model_repository=Path(repository), models=list(models), host="127.0.0.1",
                                 port=0, drain_seconds=options.pop("drain_seconds", 5.0), **options)
        server = state["server"] = ModelServer(settings)
        state["loop"] = asyncio.get_running_loop()
        try:
            state["port"] = await server.start()
        except BaseException as error:
            state["error"] = error
            started.set()
            await server.grpc.stop(None)
            await server.runtime.close()
            return
        started.set()
        await server.run_until_stopped(signals=False)

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as error:  # handed to the test thread
            state["error"] = error
            started.set()

    thread = threading.Thread(target=run, name="inprocess-server", daemon=True)
    thread.start()
    try:
        if not started.wait(timeout):
            raise RuntimeError(f"in-process server not serving after {timeout:.0f}s:\n" + "\n".join(captured.lines))
        if "error" in state:
            raise state["error"]
        yield InProcessServer(state["server"], state["port"], thread, captured)
    finally:
        if "loop" in state and thread.is_alive():
            state["loop"].call_soon_threadsafe(state["server"].drain)
        thread.join(60)
        logger.removeHandler(captured)
        logger.setLevel(level)
