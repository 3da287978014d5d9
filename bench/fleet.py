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
        **os.environ,
        "PYTHONUNBUFFERED": "1",
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
    pending: list[tuple[subprocess.Popen, Path, Path]] = []
    servers: list[ServerProcess] = []
    try:
        for index in range(count):
            port_file, log_path = workdir / f"port-{index}", workdir / f"server-{index}.log"
            command = [
                sys.executable, "-m", "tensorfleet.services",
                "--model-repository", str(repository), "--host", "127.0.0.1", "--port", "0",
                "--port-file", str(port_file), *thread_args, "--log-level", "WARNING",
                *args,
            ]  # fmt: skip
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_server_env(threads),
                    cwd=REPO_ROOT,
                )
            pending.append((process, port_file, log_path))
        deadline = time.monotonic() + timeout
        while pending:
            for item in list(pending):
                process, port_file, log_path = item
                if process.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {process.returncode}:\n{log_path.read_text(errors='replace')}"
                    )
                text = port_file.read_text().strip() if port_file.exists() else ""
                if text:
                    servers.append(
                        ServerProcess(process=process, port=int(text), log_path=log_path)
                    )
                    pending.remove(item)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(pending)} of {count} servers not ready after {timeout:.0f}s"
                )
            time.sleep(0.05)
        return servers
    except BaseException:
        stop_processes([item[0] for item in pending] + [server.process for server in servers])
        raise


def stop_processes(processes: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGTERM each by pid, wait, SIGKILL the ones still running."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


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


async def serve_echo(host: str, port_file: Path) -> None:
    """A bidi stream that sends every message (raw bytes, no protobuf) straight back."""
    import grpc

    from tensorfleet.client.settings import channel_options

    server = grpc.aio.server(options=channel_options())
    handler = grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {ECHO_METHOD: grpc.stream_stream_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    temp = port_file.with_name(port_file.name + ".tmp")
    temp.write_text(str(port))
    os.replace(temp, port_file)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


@contextlib.contextmanager
def echo_server(timeout: float = 60.0) -> Iterator[ServerProcess]:
    """The echo in its own process on loopback, like a model server; stopped by pid."""
    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-echo-"))
    port_file, log_path = workdir / "port", workdir / "echo.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.fleet", "echo", "--port-file", str(port_file)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=_server_env(1),
        )  # fmt: skip
    server: ServerProcess | None = None
    try:
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"echo server did not start:\n{log_path.read_text(errors='replace')}"
                )
            time.sleep(0.05)
        server = ServerProcess(process=process, port=int(port_file.read_text()), log_path=log_path)
        yield server
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
    echo.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    from tensorfleet.services.allocator import tune_allocator

    tune_allocator()  # what a CPU model server process gets (services/cli.py): a fair peer
    asyncio.run(serve_echo(args.host, args.port_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
