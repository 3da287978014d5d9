"""What tensorfleet's wire path costs next to raw grpcio: the same bytes, echoed over loopback.

(a) raw: a grpcio bidi stream that echoes raw bytes (no protobuf, no numpy; `bench.fleet echo`,
    its own process, the same channel options as tensorfleet);
(b) tensorfleet: `ModelStreamInfer` to an identity python model (`bench/models/identity_*`)
    through `AsyncInferenceClient.stream`, requests marked `tensorfleet.exclusive`, so each
    tensor is encoded, validated, decoded, run, encoded and decoded again;
(c) shared memory: the same as (b) with the SDK's system shared memory on (client/shared_memory.py;
    the default for a server on loopback): the tensor goes through /dev/shm, gRPC carries
    only the request's metadata.

For each tensor size (MB) and stream count, both sides move the same number of messages with
the same window in flight per stream; each stream has its own client/channel (its own TCP
connection). The sides alternate for --rounds rounds. GB/s counts payload bytes one way
(every byte also comes back). Prints one JSON line; `ratio_16mb_1stream` (tensorfleet over
gRPC / raw echo) and `shm_ratio_16mb_1stream` (shared memory / raw echo) are the target figures.

    python -m bench.transport                          # 1, 16, 64 MB; 1 and 4 streams
    python -m bench.transport --dtype uint8 --mb-per-case 1024 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import emit, machine, server_process
from bench.fleet import ECHO_PATH, echo_server, prepare_repository

MB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cpu", help="server device (the identity model stays on host)"
    )
    parser.add_argument("--dtype", choices=["fp32", "uint8"], default="fp32")
    parser.add_argument("--sizes", default="1,16,64", help="tensor sizes in MB, comma-separated")
    parser.add_argument("--streams", default="1,4", help="concurrent streams, comma-separated")
    parser.add_argument("--window", type=int, default=2, help="messages in flight per stream")
    parser.add_argument(
        "--mb-per-case", type=int, default=256, help="MB each side sends per case and round"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.streams, args.mb_per_case, args.rounds = "1", "1,2", 8, 1
    return args


async def raw_stream(channel, payload: bytes, count: int, window: int) -> int:
    """Echo `count` messages with `window` in flight; returns the bytes received."""
    call = channel.stream_stream(ECHO_PATH)()
    slots = asyncio.Semaphore(window)

    async def write() -> None:
        for _ in range(count):
            await slots.acquire()
            await call.write(payload)
        await call.done_writing()

    writer = asyncio.ensure_future(write())
    received = 0
    async for reply in call:
        received += len(reply)
        slots.release()
    await writer
    return received


async def tf_stream(client, model: str, tensor: np.ndarray, count: int, window: int) -> int:
    requests = ({"x": tensor} for _ in range(count))
    received = 0
    async for out in client.stream(
        model, requests, window=window, parameters={"tensorfleet.exclusive": True}
    ):
        received += out["y"].nbytes
    return received


async def measure_case(raw_channels, tf_clients, shm_clients, model, size_mb, streams, args) -> dict:
    dtype = np.float32 if args.dtype == "fp32" else np.uint8
    nbytes = size_mb * MB
    tensor = (
        np.random.default_rng(0).integers(0, 255, nbytes // np.dtype(dtype).itemsize).astype(dtype)
    )
    payload = tensor.tobytes()
    count = max(args.window, args.mb_per_case // (size_mb * streams))
    expected = count * nbytes * streams
    seconds = {"raw": 0.0, "tensorfleet": 0.0, "shared_memory": 0.0}
    for _ in range(args.rounds):
        started = time.perf_counter()
        got = await asyncio.gather(
            *(raw_stream(raw_channels[i], payload, count, args.window) for i in range(streams))
        )
        seconds["raw"] += time.perf_counter() - started
        assert sum(got) == expected, (sum(got), expected)
        started = time.perf_counter()
        got = await asyncio.gather(
            *(tf_stream(tf_clients[i], model, tensor, count, args.window) for i in range(streams))
        )
        seconds["tensorfleet"] += time.perf_counter() - started
        assert sum(got) == expected, (sum(got), expected)
        started = time.perf_counter()
        got = await asyncio.gather(
            *(tf_stream(shm_clients[i], model, tensor, count, args.window) for i in range(streams))
        )
        seconds["shared_memory"] += time.perf_counter() - started
        assert sum(got) == expected, (sum(got), expected)
    moved = expected * args.rounds / 1e9
    raw, served = moved / seconds["raw"], moved / seconds["tensorfleet"]
    shared = moved / seconds["shared_memory"]
    return {
        "mb": size_mb, "streams": streams, "messages_per_stream": count,
        "raw_gb_per_s": round(raw, 3), "tensorfleet_gb_per_s": round(served, 3), "ratio": round(served / raw, 3),
        "shm_gb_per_s": round(shared, 3), "shm_ratio": round(shared / raw, 3),
    }  # fmt: skip


async def run_all(
    args: argparse.Namespace, tf_address: str, raw_address: str, model: str
) -> list[dict]:
    import grpc

    from tensorfleet.client import AsyncInferenceClient
    from tensorfleet.core.settings import channel_options

    streams = [int(s) for s in args.streams.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    most = max(streams)
    raw_channels = [
        grpc.aio.insecure_channel(raw_address, options=channel_options()) for _ in range(most)
    ]
    tf_clients = [AsyncInferenceClient(tf_address, shared_memory=False) for _ in range(most)]
    shm_clients = [AsyncInferenceClient(tf_address, shared_memory=True) for _ in range(most)]
    try:
        warm = {"mb": 1, "rounds": 1}
        await measure_case(
            raw_channels, tf_clients, shm_clients, model, 1, most, argparse.Namespace(**{**vars(args), **warm})
        )
        return [
            await measure_case(raw_channels, tf_clients, shm_clients, model, size, n, args)
            for size in sizes
            for n in streams
        ]
    finally:
        for channel in raw_channels:
            await channel.close()
        for client in tf_clients + shm_clients:
            await client.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = f"identity_{args.dtype}"
    with tempfile.TemporaryDirectory(prefix="tf-bench-transport-") as tmp:
        repository = prepare_repository(Path(tmp), {model: None})
        with (
            echo_server() as echo,
            server_process(
                repository,
                "--model",
                model,
                "--device",
                args.device,
                "--log-level",
                "WARNING",
                threads=1,
            ) as server,
        ):
            cases = asyncio.run(run_all(args, server.address, echo.address, model))
    record = {
        "bench": "transport",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "device": args.device,
        "dtype": args.dtype,
        "window": args.window,
        "rounds": args.rounds,
        "channels": "one per stream",
        "cases": cases,
    }
    for case in cases:
        label = f"{case['mb']}mb_{case['streams']}stream{'s' if case['streams'] > 1 else ''}"
        record[f"ratio_{label}"] = case["ratio"]
        record[f"shm_ratio_{label}"] = case["shm_ratio"]
    emit(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
