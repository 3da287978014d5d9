"""Soak: one server under 256 concurrent callers for --minutes, then its figures.

Callers (asyncio, raw gRPC stubs, tests/models/simple): valid unary requests, malformed unary
requests (each must get INVALID_ARGUMENT), streams of valid and malformed requests (each reply
must carry its own result or error_message), streams cancelled mid-way, and clients that vanish
(a channel closed with requests unanswered). Anything else a caller sees is an unexpected error.
The server's RSS and open file descriptors are sampled over time; growth is measured from the
end of warm-up (the first fifth of the run) to the end (the mean of the last three samples).

Run: python -m bench.soak [--minutes 10] [--quick]; prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter

import grpc
import numpy as np

from bench.common import REPO_ROOT, emit, machine
from tests.serving import launch_server

MODELS = REPO_ROOT / "tests" / "models"
CALLERS = 256


def valid(rows: int, request_id: str = "") -> object:
    from tensorfleet.protos import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name="simple", id=request_id)
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[rows, 16])
        request.raw_input_contents.append(np.full((rows, 16), 0.5, dtype=np.float32).tobytes())
    return request


def malformed(rng: random.Random, request_id: str = "") -> object:
    request = valid(rng.randint(1, 4), request_id)
    choice = rng.randrange(4)
    if choice == 0:
        request.inputs[0].datatype = "INT64"
    elif choice == 1:
        request.raw_input_contents[1] = b"\0" * 3
    elif choice == 2:
        request.inputs[0].shape[:] = [1, 17]
    else:
        request.model_name = "no_such_model"
    return request


def usage(pid: int) -> tuple[int, int]:
    """(RSS bytes, open fds) of a process."""
    with open(f"/proc/{pid}/status") as handle:
        rss = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, address: str, seconds: float, seed: int) -> None:
        self.address, self.seconds = address, seconds
        self.rng = random.Random(seed)
        self.counts: Counter = Counter()
        self.unexpected: Counter = Counter()
        self.examples: list[str] = []
        self.latencies: list[float] = []

    def _unexpected(self, what: str, error: object) -> None:
        self.unexpected[what] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{what}: {error}")

    async def run(self) -> None:
        from tensorfleet.core.settings import channel_options
        from tensorfleet.protos import inference_pb2_grpc as pb_grpc

        # Each channel its own connection: grpc shares one subchannel between equal channels,
        # and 256 callers on one connection pass the server's 256 streams per connection.
        self.options = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
        self.pb_grpc = pb_grpc
        channels = [grpc.aio.insecure_channel(self.address, options=self.options) for _ in range(16)]
        self.deadline = time.monotonic() + self.seconds
        kinds = ["unary"] * 96 + ["malformed"] * 32 + ["stream"] * 80 + ["cancel"] * 32 + ["vanish"] * 16
        assert len(kinds) == CALLERS
        await asyncio.gather(*(self._caller(kind, channels[i % len(channels)], i) for i, kind in enumerate(kinds)))
        for channel in channels:
            await channel.close()

    async def _caller(self, kind: str, channel: grpc.aio.Channel, seed: int) -> None:
        rng = random.Random(seed)
        stub = self.pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < self.deadline:
            try:
                await getattr(self, f"_{kind}")(stub, rng)
            except grpc.aio.AioRpcError as error:
                self._unexpected(f"{kind} {error.code().name}", error.details())
            except Exception as error:  # noqa: BLE001 - a caller's surprise is a figure, not a crash
                self._unexpected(f"{kind} {type(error).__name__}", error)

    async def _unary(self, stub, rng: random.Random) -> None:
        started = time.perf_counter()
        reply = await stub.ModelInfer(valid(rng.randint(1, 8)), timeout=60)
        self.latencies.append(time.perf_counter() - started)
        if len(reply.raw_output_contents) != 2:
            self._unexpected("unary reply", "outputs missing")
        self.counts["unary"] += 1

    async def _malformed(self, stub, rng: random.Random) -> None:
        try:
            await stub.ModelInfer(malformed(rng), timeout=60)
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                raise
            self.counts["malformed"] += 1
            return
        self._unexpected("malformed", "accepted")

    async def _stream(self, stub, rng: random.Random) -> None:
        bad = {i for i in range(8) if rng.random() < 0.25}
        requests = [malformed(rng, str(i)) if i in bad else valid(rng.randint(1, 8), str(i)) for i in range(8)]
        call = stub.ModelStreamInfer(iter(requests), timeout=120)
        seen = set()
        async for reply in call:
            request_id = reply.infer_response.id
            if reply.error_message and not request_id:
                # an error for a request whose id the server could not read back: counts if expected
                seen.add(next(iter(sorted(bad - seen)), "?"))
                continue
            if (int(request_id) in bad) != bool(reply.error_message):
                self._unexpected("stream reply", f"request {request_id}: error {reply.error_message!r}")
            seen.add(int(request_id))
        if len(seen) != len(requests):
            self._unexpected("stream", f"{len(requests) - len(seen)} replies missing")
        self.counts["stream_requests"] += len(requests)

    async def _cancel(self, stub, rng: random.Random) -> None:
        call = stub.ModelStreamInfer(iter([valid(8, str(i)) for i in range(32)]), timeout=120)
        stop_after = rng.randint(0, 8)
        received = 0
        async for _ in call:
            received += 1
            if received >= stop_after:
                break
        call.cancel()
        self.counts["cancelled_streams"] += 1

    async def _vanish(self, stub, rng: random.Random) -> None:
        channel = grpc.aio.insecure_channel(self.address, options=self.options)
        call = self.pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([valid(8, str(i)) for i in range(16)]), timeout=120
        )
        with_reply = rng.random() < 0.5
        if with_reply:
            await call.read()
        await channel.close(grace=None)  # gone, replies unread
        self.counts["vanished_clients"] += 1


def growth(samples: list[tuple[float, int, int]], index: int, warm: int) -> float:
    base = samples[warm][index]
    tail = samples[-3:]
    return (sum(s[index] for s in tail) / len(tail) - base) / base


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="30 seconds (the smoke test)")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    seconds = 30.0 if args.quick else args.minutes * 60
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = launch_server(MODELS, "--model", "simple", "--log-level", "WARNING")
    samples: list[tuple[float, int, int]] = []
    try:
        soak = Soak(server.address, seconds, args.seed)
        started = time.monotonic()

        async def sample() -> None:
            every = max(seconds / 40, 1.0)
            while time.monotonic() - started < seconds + 1:
                samples.append((round(time.monotonic() - started, 1), *usage(server.pid)))
                await asyncio.sleep(every)

        async def both() -> None:
            sampler = asyncio.create_task(sample())
            await soak.run()
            await sampler

        asyncio.run(both())
        alive = server.process.poll() is None
    finally:
        server.stop(signal.SIGKILL)
    warm = len(samples) // 5
    latencies = sorted(soak.latencies)
    emit({
        "bench": "soak",
        "machine": machine(),
        "seconds": round(seconds),
        "callers": CALLERS,
        "requests": dict(soak.counts),
        "requests_total": sum(soak.counts.values()),
        "unexpected_errors": sum(soak.unexpected.values()),
        "unexpected_by_kind": dict(soak.unexpected),
        "unexpected_examples": soak.examples,
        "server_alive": alive,
        "rss_mb": [round(s[1] / 2**20, 1) for s in samples],
        "fds": [s[2] for s in samples],
        "sample_s": [s[0] for s in samples],
        "rss_growth_after_warmup": round(growth(samples, 1, warm), 4),
        "fd_growth_after_warmup": round(growth(samples, 2, warm), 4),
        "unary_p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
        "unary_p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2) if latencies else None,
    })


if __name__ == "__main__":
    main()
