"""Many light simulated devices in one process: each its own gRPC port, queue and time per row.

Why: `bench.scale` used one `python -m tensorfleet.services` process per simulated server, which
stops at about 64 on a 2-core machine. A device here costs one grpc.aio server object in a
shared event loop, so one process hosts hundreds to a thousand of them, and the coordinator
sees what it sees in production: N addresses, each a server of the same model that speaks the
real protocol (grpc.health.v1 Check, ModelReady, ModelConfig, ModelStatistics, ModelInfer and
ModelStreamInfer through the project's wire codec and handler table, `services/server.py`).

Each device runs one batch at a time, in arrival order, for `ms_per_row` x rows. Its clock is
virtual: a request that arrives while the device is free starts at once, one that arrives while
it is busy starts when the one before it ends, and its reply is sent when it ends (a timer on
the event loop, no CPU while "computing"). So a device's busy time is exactly its rows x
ms_per_row, and it is idle only while nothing of it is queued: the busy fraction over a span
measures whether the coordinator kept it fed, not how late this process's event loop ran
(a late reply can delay the next request, which is then counted as idle; that cost is this
host's, and the bench reports this process's CPU next to it). ModelStatistics reports the busy
time as `compute_infer` and the batches as `execution_count`, as a real server does, so
`bench.scale`'s reading of server statistics is unchanged.

The model ("null" at ms_per_row 0: it answers at once): one input `x` (`--input-dtype`,
`--input-shape`; BYTES rows take shape []), one output `y`: the input echoed back
(`--output echo`) or `--output fp32:N` (N zeros a row, like an embedding).

    python -m bench.sim_devices --devices 1000 --ms-per-row 2.5 --ready-file /tmp/x/ready.json

`sim_fleet()` starts it (optionally split over a few processes) and stops it by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from tensorfleet.core import wire
from tensorfleet.core.errors import InvalidArgument, NotFound
from tensorfleet.protos import inference_pb2 as pb
from tensorfleet.protos import model_config_pb2 as mc
from tensorfleet.services.frontends.grpc_converters import stream_error_reply

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SimModel:
    """What every device of a process serves."""

    name: str = "sleep_rows"
    max_batch_size: int = 64
    input_dtype: str = "FP32"
    input_shape: tuple[int, ...] = (4,)
    output: str = "echo"  # or "fp32:N"

    @property
    def output_dtype(self) -> str:
        return self.input_dtype if self.output == "echo" else "FP32"

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.input_shape if self.output == "echo" else (int(self.output.split(":", 1)[1]),)


class SimDevice:
    """One device's queue on a virtual clock (event-loop time): busy seconds, batches, rows."""

    def __init__(self, seconds_per_row: float) -> None:
        self.seconds_per_row = seconds_per_row
        self.free_at = 0.0
        self.busy_s = 0.0
        self.batches = 0
        self.rows = 0

    def schedule(self, rows: int, now: float) -> float:
        """Queue a batch of `rows` arriving at `now`; when it ends."""
        start = max(now, self.free_at)
        seconds = rows * self.seconds_per_row
        self.free_at = start + seconds
        self.busy_s += seconds
        self.batches += 1
        self.rows += rows
        return self.free_at


class SimServicer:
    """GRPCInferenceService for one device (the methods the coordinator and SDK call)."""

    def __init__(self, device: SimDevice, model: SimModel) -> None:
        self.device = device
        self.model = model
        self._zeros: dict[int, bytes] = {}
        config = mc.ModelConfig(name=model.name, backend="python", max_batch_size=model.max_batch_size)
        config.input.add(name="x", data_type=mc.DataType.Value(_config_type(model.input_dtype)),
                         dims=list(model.input_shape))
        config.output.add(name="y", data_type=mc.DataType.Value(_config_type(model.output_dtype)),
                          dims=list(model.output_shape))
        for key, value in {"version": "1", "precision": "fp32", "artifact_sha256": "simulated"}.items():
            config.parameters[key].string_value = value
        self._config = config

    def __getattr__(self, name: str):
        """The rpcs a device does not simulate (repository, shared memory): UNIMPLEMENTED, as a
        server without that extension answers (the SDK then sends tensors over gRPC)."""
        if not name[:1].isupper():
            raise AttributeError(name)

        async def unimplemented(request, context):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not simulated")

        return unimplemented

    # --- health and metadata ------------------------------------------------------------
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="tensorfleet-sim", version="0")

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == self.model.name)

    async def ModelConfig(self, request, context):
        if request.name != self.model.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model '{request.name}' is not served here")
        return pb.ModelConfigResponse(config=self._config)

    async def ModelMetadata(self, request, context):
        tensor = pb.ModelMetadataResponse.TensorMetadata
        batch = [-1]
        return pb.ModelMetadataResponse(
            name=self.model.name, versions=["1"], platform="python",
            inputs=[tensor(name="x", datatype=self.model.input_dtype, shape=batch + list(self.model.input_shape))],
            outputs=[tensor(name="y", datatype=self.model.output_dtype, shape=batch + list(self.model.output_shape))],
        )

    async def ModelStatistics(self, request, context):
        stats = pb.ModelStatistics(name=self.model.name, version="1", inference_count=self.device.rows,
                                   execution_count=self.device.batches)
        stats.inference_stats.compute_infer.count = self.device.batches
        stats.inference_stats.compute_infer.ns = int(self.device.busy_s * 1e9)
        return pb.ModelStatisticsResponse(model_stats=[stats])

    # --- inference ----------------------------------------------------------------------
    def _answer(self, request):
        """(the reply, when it is due on the loop's clock), or (an error reply, now)."""
        now = asyncio.get_running_loop().time()
        message = request.message
        if request.error is not None:
            return stream_error_reply(message, request.error), now
        if message.model_name != self.model.name:
            return stream_error_reply(message, NotFound(f"model '{message.model_name}' is not served here")), now
        if len(message.inputs) != 1 or len(request.raw) != 1 or not message.inputs[0].shape:
            return stream_error_reply(message, InvalidArgument("expected one raw input tensor 'x'")), now
        rows = int(message.inputs[0].shape[0])
        if rows > self.model.max_batch_size:
            return stream_error_reply(message, InvalidArgument(
                f"{rows} rows exceed max_batch_size {self.model.max_batch_size}")), now
        if self.model.output == "echo":
            shape, raw = list(message.inputs[0].shape), request.raw[0]
        else:
            shape = [rows, *self.model.output_shape]
            size = rows * 4 * self.model.output_shape[0]
            raw = self._zeros.get(size) or self._zeros.setdefault(size, bytes(size))
        response = pb.ModelInferResponse(model_name=self.model.name, model_version="1", id=message.id)
        response.outputs.add(name="y", datatype=self.model.output_dtype, shape=shape)
        due = self.device.schedule(rows, now)
        return wire.StreamResponse(response=wire.InferResponse(response, [raw])), due

    async def ModelInfer(self, request, context):
        reply, due = self._answer(request)
        if reply.error_message:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reply.error_message)
        await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
        return reply.response

    async def ModelStreamInfer(self, request_iterator: AsyncIterator, context) -> AsyncIterator:
        """Each reply at its batch's end (a timer), in the device's order; errors per request."""
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue = asyncio.Queue()
        pending = 0
        reading = True

        def deliver(reply) -> None:
            nonlocal pending
            pending -= 1
            replies.put_nowait(reply)
            if not reading and pending == 0:
                replies.put_nowait(None)

        async def read_all() -> None:
            nonlocal pending, reading
            try:
                async for request in request_iterator:
                    reply, due = self._answer(request)
                    pending += 1
                    loop.call_at(due, deliver, reply)
            finally:
                reading = False
                if pending == 0:
                    replies.put_nowait(None)

        reader = asyncio.ensure_future(read_all())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader
        finally:
            reader.cancel()


def _config_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


class _Health:
    """grpc.health.v1: SERVING (a device is always ready)."""

    async def Check(self, request, context):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request, context):
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def serve_devices(count: int, seconds_per_row: float, model: SimModel, ready_file: Path) -> None:
    """`count` devices on loopback ports from the OS; their ports to `ready_file` (JSON); until SIGTERM."""
    from grpc_health.v1 import health_pb2_grpc

    from tensorfleet.core.settings import server_options
    from tensorfleet.services.server import INFERENCE_SERVICE, add_service, inference_handlers

    servers, devices, ports = [], [], []
    for _ in range(count):
        device = SimDevice(seconds_per_row)
        server = grpc.aio.server(options=server_options())
        add_service(server, INFERENCE_SERVICE, inference_handlers(SimServicer(device, model)))
        health_pb2_grpc.add_HealthServicer_to_server(_Health(), server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
        devices.append(device)
    temp = ready_file.with_name(ready_file.name + ".tmp")
    temp.write_text(json.dumps({"pid": os.getpid(), "ports": ports}))
    os.replace(temp, ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await asyncio.gather(*(server.stop(0.5) for server in servers))


# --- the launcher -----------------------------------------------------------------------------
@dataclass
class SimFleet:
    addresses: list[str]
    pids: list[int]
    startup_s: float


def sim_command(count: int, ms_per_row: float, model: SimModel, ready_file: Path) -> list[str]:
    return [
        sys.executable, "-m", "bench.sim_devices", "--devices", str(count), "--ms-per-row", str(ms_per_row),
        "--model", model.name, "--max-batch", str(model.max_batch_size), "--input-dtype", model.input_dtype,
        "--input-shape", ",".join(map(str, model.input_shape)), "--output", model.output,
        "--ready-file", str(ready_file),
    ]  # fmt: skip


@contextlib.contextmanager
def sim_fleet(
    count: int, ms_per_row: float, model: SimModel | None = None, processes: int = 1, timeout: float = 300.0
) -> Iterator[SimFleet]:
    """`count` simulated devices over `processes` processes; stopped by pid (SIGTERM, then SIGKILL)."""
    from tensorfleet.core.process import start_process, stop_processes

    model = model or SimModel()
    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-sim-"))
    shares = [count // processes + (1 if index < count % processes else 0) for index in range(processes)]
    started: list[tuple[subprocess.Popen, Path]] = []
    begun = time.perf_counter()
    try:
        for index, share in enumerate(s for s in shares if s):
            ready = workdir / f"ready-{index}.json"
            command = sim_command(share, ms_per_row, model, ready)
            started.append((start_process(command, workdir / f"sim-{index}.log", cwd=REPO_ROOT), ready))
        addresses = []
        deadline = time.monotonic() + timeout
        for process, ready in started:
            while not ready.is_file():
                if process.poll() is not None:
                    log = (workdir / f"sim-{started.index((process, ready))}.log").read_text()[-2000:]
                    raise RuntimeError(f"simulated devices exited {process.returncode} before ready:\n{log}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"simulated devices not ready after {timeout:.0f}s")
                time.sleep(0.05)
            addresses += [f"127.0.0.1:{port}" for port in json.loads(ready.read_text())["ports"]]
        fleet = SimFleet(addresses, [process.pid for process, _ in started], time.perf_counter() - begun)
        yield fleet
    finally:
        stop_processes([process for process, _ in started])
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--ms-per-row", type=float, default=0.0, help="simulated compute per row (0: a null model)")
    parser.add_argument("--model", default="sleep_rows")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--input-dtype", default="FP32", help="OIP datatype of input x (BYTES for sequences)")
    parser.add_argument("--input-shape", default="4", help="row shape of x, comma-separated ('' for BYTES rows)")
    parser.add_argument("--output", default="echo", help="echo (y = x) or fp32:N (N zeros a row)")
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args(argv)
    shape = tuple(int(d) for d in args.input_shape.split(",") if d)
    model = SimModel(args.model, args.max_batch, args.input_dtype, shape, args.output)
    asyncio.run(serve_devices(args.devices, args.ms_per_row / 1000, model, args.ready_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
