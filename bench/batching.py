"""Dynamic batching: many one-row clients vs one client sending full batches, same model and server.

(a) offline: one `AsyncInferenceClient` streams max-size batches (`max_batch_size` rows each,
    --window in flight): the model's throughput when batching is free. Measured before and
    after the client levels; the mean is the baseline.
(b) online: N concurrent clients, each its own `AsyncInferenceClient` (its own channel and
    TCP connection; --shared-channel: one client for all), each sending one-row `infer`
    calls back to back for --seconds. The server's batcher merges them. Each level runs
    twice: as unary calls (`ratio_N_clients`) and with `shared_stream=True`, where each
    client's calls are messages on one open stream (`ratio_N_clients_shared_stream`).

The model is `bench/models/mlp`, a torch MLP (width -> hidden x layers -> out) from a fixed
seed, one server with --threads torch threads; the clients run in this process, one
asyncio loop. Prints one JSON line: rows/s per level, ratio to offline, the server's
mean batch size per level (from ModelStatistics), and the CPU each one-row request costs the
server outside the model (its CPU less the model's compute time) and the clients.
`cpu_ceiling_ratio` is what those costs allow on this machine's cores when the model's
per-row time at full batches (from the offline rate) is added: on a 2-core VM with a cheap
model the ceiling, not the batcher, bounds the ratio. `offline_ratio_at_this_batch_size`
is the other bound: the offline stream's rate at the mean batch size that level formed (N
closed-loop clients, each with one request in flight, form batches of about N/2 rows while
the model runs), over the full-batch rate; `offline_ratio_if_every_client_were_in_each_batch`
the same at N rows (or max_batch), the most N one-row clients could reach with free requests.

    python -m bench.batching                                  # CPU, 1024 -> 2048 x2 -> 256
    python -m bench.batching --device cuda --hidden 8192 --layers 4 --clients 1,8,64,256,1024
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import emit, machine, server_process
from bench.fleet import prepare_repository

MODEL = "mlp"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=1, help="server torch threads")
    parser.add_argument("--width", type=int, default=1024, help="input features per row")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=int, default=256, help="output features per row")
    parser.add_argument("--max-batch", type=int, default=256, help="model max_batch_size")
    parser.add_argument(
        "--queue-delay-ms", type=float, default=2.0, help="batcher max_queue_delay_ms"
    )
    parser.add_argument(
        "--clients", default="1,8,64,256", help="concurrent one-row clients per level"
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="measured time per level")
    parser.add_argument(
        "--offline-batches", type=int, default=24, help="max-size batches per offline run"
    )
    parser.add_argument("--window", type=int, default=2, help="offline requests in flight")
    parser.add_argument(
        "--shared-channel", action="store_true", help="all clients share one channel"
    )
    parser.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.hidden, args.out, args.max_batch = 64, 128, 16, 32
        args.clients, args.seconds, args.offline_batches = "1,4", 1.0, 8
    return args


async def offline(client, rows: np.ndarray, batches: int, window: int) -> float:
    """Rows/s streaming `batches` full batches."""
    started = time.perf_counter()
    done = 0
    async for out in client.stream(MODEL, ({"x": rows} for _ in range(batches)), window=window):
        done += len(out["y"])
    return done / (time.perf_counter() - started)


async def online(clients: list, count: int, row: np.ndarray, seconds: float) -> float:
    """Rows/s of `count` one-row callers over `seconds` (requests finishing in the window)."""
    stop_at = time.perf_counter() + seconds
    done = 0

    async def caller(client) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await client.infer(MODEL, {"x": row})
            if time.perf_counter() <= stop_at:
                done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(clients[i % len(clients)]) for i in range(count)))
    return done / min(seconds, time.perf_counter() - started)


async def counters(client) -> np.ndarray:
    """(rows, batches, seconds in the model) served so far, from ModelStatistics."""
    stats = (await client.model_statistics(MODEL)).model_stats[0]
    timing = stats.inference_stats
    model_ns = timing.compute_input.ns + timing.compute_infer.ns + timing.compute_output.ns
    return np.array([stats.inference_count, stats.execution_count, model_ns / 1e9])


def mean_batch(delta: np.ndarray) -> float | None:
    return round(float(delta[0] / delta[1]), 2) if delta[1] else None


def process_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_ceiling(server_ms: float, client_ms: float, model_ms_per_row: float) -> float:
    """Rows/s a one-row-per-request load can reach when all cores only do this work:
    each row costs the server's (outside the model) and the clients' per-request CPU plus
    the model's per-row time at full batches. A ratio near ceiling / offline is the most
    this machine allows."""
    return (os.cpu_count() or 1) * 1000.0 / (server_ms + client_ms + model_ms_per_row)


async def measure(args: argparse.Namespace, address: str, server_pid: int) -> dict:
    from tensorfleet.client import AsyncInferenceClient

    levels = [int(c) for c in args.clients.split(",")]
    rng = np.random.default_rng(0)
    full = rng.standard_normal((args.max_batch, args.width), dtype=np.float32)
    row = full[:1].copy()
    control = AsyncInferenceClient(address)
    count = 1 if args.shared_channel else max(levels)
    calls = {
        "": [AsyncInferenceClient(address) for _ in range(count)],
        "_shared_stream": [AsyncInferenceClient(address, shared_stream=True) for _ in range(count)],
    }
    try:
        await offline(control, full, 2, args.window)  # warm up
        for clients in calls.values():
            await online(clients, min(8, max(levels)), row, 0.3)
        seen = await counters(control)
        first = await offline(control, full, args.offline_batches, args.window)
        offline_batch = mean_batch(await counters(control) - seen)
        results = []
        for level in levels:
            for kind, clients in calls.items():
                seen = await counters(control)
                server_cpu, client_cpu = process_cpu_s(server_pid), time.process_time()
                rate = await online(clients, level, row, args.seconds)
                server_cpu = process_cpu_s(server_pid) - server_cpu
                client_cpu = time.process_time() - client_cpu
                served = await counters(control) - seen
                requests = max(served[0], 1)  # one row each
                results.append(
                    {"clients": level, "calls": kind.lstrip("_") or "unary",
                     "rows_per_s": round(rate, 1), "server_mean_batch_rows": mean_batch(served),
                     "server_cpu_ms_per_request": round(server_cpu / requests * 1e3, 3),
                     "server_cpu_ms_per_request_outside_model":
                         round((server_cpu - served[2]) / requests * 1e3, 3),
                     "client_cpu_ms_per_request": round(client_cpu / requests * 1e3, 3),
                     "key": f"ratio_{level}_clients{kind}"}
                )
        last = await offline(control, full, args.offline_batches, args.window)
        # what batches of the size each level formed can do, streamed offline: closed-loop
        # clients (one request each in flight) form batches of about half their count
        sizes = sorted({max(1, round(item["server_mean_batch_rows"] or 1)) for item in results}
                       | {min(level, args.max_batch) for level in levels})
        at_size = {}
        for size in sizes:
            batches = max(4, args.offline_batches * args.max_batch // size // 4)
            at_size[size] = await offline(control, full[:size], batches, args.window)
    finally:
        for client in [control, *calls[""], *calls["_shared_stream"]]:
            await client.close()
    baseline = (first + last) / 2
    model_ms_per_row = 1000.0 / baseline
    for item in results:
        item["ratio"] = round(item["rows_per_s"] / baseline, 3)
        ceiling = cpu_ceiling(
            item["server_cpu_ms_per_request_outside_model"], item["client_cpu_ms_per_request"],
            model_ms_per_row,
        )
        item["cpu_ceiling_ratio"] = round(min(ceiling / baseline, 1.0), 3)
        size = max(1, round(item["server_mean_batch_rows"] or 1))
        item["offline_ratio_at_this_batch_size"] = round(at_size[size] / baseline, 3)
        every_client = at_size[min(item["clients"], args.max_batch)]
        item["offline_ratio_if_every_client_were_in_each_batch"] = round(every_client / baseline, 3)
    return {
        "offline_rows_per_s": round(baseline, 1),
        "offline_runs_rows_per_s": [round(first, 1), round(last, 1)],
        "offline_mean_batch_rows": offline_batch,
        "levels": results,
        **{item.pop("key"): item["ratio"] for item in results},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        "max_batch_size": args.max_batch,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [args.width]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [args.out]}],
        "batching": {"max_queue_delay_ms": args.queue_delay_ms},
        "parameters": {
            "width": args.width,
            "hidden": args.hidden,
            "layers": args.layers,
            "out": args.out,
        },
    }
    with tempfile.TemporaryDirectory(prefix="tf-bench-batching-") as tmp:
        repository = prepare_repository(Path(tmp), {MODEL: overrides})
        server_args = ["--model", MODEL, "--device", args.device, "--log-level", "WARNING"]
        with server_process(repository, *server_args, threads=args.threads) as server:
            figures = asyncio.run(measure(args, server.address, server.pid))
    emit(
        {
            "bench": "batching",
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "device": args.device,
            "model": f"mlp {args.width}->{args.hidden}x{args.layers}->{args.out}",
            "threads": args.threads,
            "max_batch": args.max_batch,
            "queue_delay_ms": args.queue_delay_ms,
            "clients_share": "one channel" if args.shared_channel else "one client (channel) each",
            "seconds_per_level": args.seconds,
            **figures,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
