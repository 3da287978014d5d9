"""Helpers for the fleet benchmarks: bench model repositories, many servers, a raw echo, timed commands.

Every process started here is stopped by pid (SIGTERM, then SIGKILL) by whoever started it;
the context managers do it in `finally`. Also runnable: `python -m bench.fleet echo --port-file F`
serves the raw grpcio bytes echo that `bench.transport` compares against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.common import REPO_ROOT
from tensorfleet.core.process import (
    server_command,
    start_and_wait,
    start_process,
    stop_processes,
    wait_for_port_files,
    write_port_file,
)
from tests.serving import ServerProcess

BENCH_MODELS = Path(__file__).resolve().parent / "models"
ECHO_SERVICE, ECHO_METHOD = "bench.Echo", "Stream"
ECHO_PATH = f"/{ECHO_SERVICE}/{ECHO_METHOD}"


# --- model repositories ---------------------------------------------------------------------
def _merge(base: dict, update: Mapping[str, Any]) -> dict:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def prepare_repository(target: Path, models: Mapping[str, Mapping[str, Any] | None]) -> Path:
    """Copy bench models into `target`, each config.yaml updated with its overrides (nested merge)."""
    target.mkdir(parents=True, exist_ok=True)
    for name, overrides in models.items():
        folder = target / name
        shutil.copytree(BENCH_MODELS / name, folder, dirs_exist_ok=True)
        if overrides:
            config = yaml.safe_load((folder / "config.yaml").read_text())
            (folder / "config.yaml").write_text(yaml.safe_dump(_merge(config, overrides)))
    return target


# --- many servers -------------------------------------------------------------------------------
def _server_env(threads: int | None) -> dict[str, str]:
    threads = threads or 1
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }


def start_servers(
    repository: Path, count: int, *args: str, threads: int | None = 1, timeout: float = 600.0
) -> list[ServerProcess]:
    """Start `count` servers at once and wait until every one is SERVING (its port file is written).

    Parallel start matters at 64 servers: each spends about a second importing. threads=None
    leaves out `--threads` (which imports torch in the server) for models that never use torch.
    """
    thread_args = ["--threads", str(threads)] if threads else []
    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-fleet-"))
    started: list[tuple[subprocess.Popen, Path, Path]] = []
    try:
        for index in range(count):
            port_file, log_path = workdir / f"port-{index}", workdir / f"server-{index}.log"
            command = server_command(
                "--model-repository", str(repository), "--host", "127.0.0.1", *thread_args,
                "--log-level", "WARNING", *args, port_file=port_file,
            )  # fmt: skip
            process = start_process(command, log_path, env=_server_env(threads), cwd=REPO_ROOT)
            started.append((process, port_file, log_path))
        ports = wait_for_port_files(started, timeout)
    except BaseException:
        stop_processes([process for process, _, _ in started])
        raise
    return [
        ServerProcess(process=process, port=port, log_path=log_path)
        for (process, _, log_path), port in zip(started, ports, strict=True)
    ]


@contextlib.contextmanager
def fleet(
    repository: Path, count: int, *args: str, threads: int | None = 1
) -> Iterator[list[ServerProcess]]:
    servers = start_servers(repository, count, *args, threads=threads)
    try:
        yield servers
    finally:
        stop_processes([server.process for server in servers])


# --- the raw grpcio echo -------------------------------------------------------------------------
async def _echo(requests: Any, context: Any) -> Any:
    async for message in requests:
        yield message


async def serve_echo(host: str, port_file: Path, port: int = 0) -> None:
    """A bidi stream that sends every message (raw bytes, no protobuf) straight back."""
    import grpc

    from tensorfleet.core.settings import channel_options

    server = grpc.aio.server(options=channel_options())
    handler = grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {ECHO_METHOD: grpc.stream_stream_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    write_port_file(port_file, port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


@contextlib.contextmanager
def echo_server(timeout: float = 60.0) -> Iterator[ServerProcess]:
    """The echo in its own process on loopback, like a model server; stopped by pid."""
    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-echo-"))
    port_file = workdir / "port"
    command = server_command("echo", port_file=port_file, module="bench.fleet")
    process, port = start_and_wait(command, port_file, workdir / "echo.log", timeout, what="echo server",
                                   env=_server_env(1), cwd=REPO_ROOT)
    try:
        yield ServerProcess(process=process, port=port, log_path=workdir / "echo.log")
    finally:
        stop_processes([process])


# --- timed commands ----------------------------------------------------------------------------
@dataclass
class Measured:
    returncode: int
    wall_s: float
    cpu_s: float  # user + system of the command itself (its waited-for children are not counted)
    stdout: str
    stderr: str


def run_measured(
    command: list[str], *, timeout: float = 900.0, env: Mapping[str, str] | None = None
) -> Measured:
    """Run a command to the end; wall time and its own CPU seconds from the kernel (wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=out, stderr=err, cwd=REPO_ROOT, env={**os.environ, **(env or {})}
        )
        try:
            cpu = _wait_cpu(process, timeout)
        except BaseException:
            stop_processes([process])
            raise
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        return Measured(
            process.returncode,
            wall,
            cpu,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def _wait_cpu(process: subprocess.Popen, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.args} still running after {timeout:.0f}s")
        time.sleep(0.01)


def speed_line(stdout: str) -> tuple[int, float] | None:
    """(rows computed, dispatch seconds) from `tensorfleet run`'s summary line `speed: N rows computed in Ts`."""
    for line in stdout.splitlines():
        if line.startswith("speed:"):
            words = line.split()
            return int(words[1]), float(words[5].rstrip("s"))
    return None


def write_job(path: Path, spec: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(spec), sort_keys=False))
    return path


def tensorfleet_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tensorfleet.coordinator", *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bench helpers: serve the raw grpcio echo")
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo", help="serve the raw bytes echo on loopback")
    echo.add_argument("--port-file", type=Path, required=True)
    echo.add_argument("--port", type=int, default=0)
    echo.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    from tensorfleet.services.allocator import tune_allocator

    tune_allocator()  # what a CPU model server process gets (services/cli.py): a fair peer
    asyncio.run(serve_echo(args.host, args.port_file, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
