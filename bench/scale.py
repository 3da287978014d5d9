"""How busy one coordinator keeps a fleet: 8, 32, 64 simulated servers on loopback.

Each server is its own `python -m tensorfleet.services` process serving only
`bench/models/sleep_rows`, a python model that sleeps --ms-per-row per row (a device that is
busy for a fixed time per row and uses no CPU). The fleet starts once, at the largest size;
each level runs `tensorfleet run JOB --servers <the first N>` as a subprocess over an .npy
input of N x --rows-per-server rows.

Every server answers one request before the levels run (a warm fleet, as in production).
The dispatch span runs from the job's first lease to its last commit (the job's
manifest.sqlite). Two figures per level:

- busy(N): how much of the span each server's model was running, from the servers' own
  ModelStatistics (compute_infer time during the level / span), averaged over the servers.
  This is what the coordinator controls: a server waiting for work lowers it.
- throughput_ratio(N): achieved rows/s over the span / (N x the rows/s of one server driven
  alone by the SDK, full batches, --window in flight, exclusive; measured in the same run).
  It also counts the simulated device itself running slower: with N server processes on
  this host's few cores, a 128 ms sleep returns several ms late (`model_ms_per_request`
  beside `alone_model_ms_per_request`), which no dispatcher can win back.

Coordinator CPU comes from psutil samples of the `tensorfleet run` process, interpolated to
the same span, per committed chunk; its total CPU (start-up, plan and merge included) is
reported too.

    python -m bench.scale                                    # 8, 32, 64 servers at 2 ms/row
    python -m bench.scale --servers 8,32 --rows-per-server 4096

`--light`: the servers are simulated devices hosted many to a process (`bench/sim_devices.py`:
each its own port, queue and virtual clock, the real gRPC protocol), so the fleet reaches 256 and
1,000 servers on a 2-core machine. Busy is then each device's simulated compute over the span
(no sleep slips: a device idles only while nothing of it is queued). `--sweep-ms` runs the
largest size again at each per-row time, to find the fastest device one coordinator keeps
>= 0.95 busy; rows per server then follow --device-seconds (each device's work at full speed).

    python -m bench.scale --light --servers 256,1000 --ms-per-row 2.5 --sweep-ms 5,10,20 --batch 256 --chunk-rows 1024
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import emit, machine
from bench.fleet import fleet, prepare_repository, tensorfleet_command, write_job

MODEL = "sleep_rows"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="8,32,64", help="fleet sizes, comma-separated")
    parser.add_argument("--ms-per-row", type=float, default=2.0, help="simulated compute per row")
    parser.add_argument(
        "--batch", type=int, default=64, help="rows per request (model max_batch_size)"
    )
    parser.add_argument("--chunk-rows", type=int, default=256, help="rows per checkpointed chunk")
    parser.add_argument("--window", type=int, default=4, help="requests in flight per server")
    parser.add_argument(
        "--rows-per-server", type=int, default=None,
        help="input rows per server per level (default 4096: a 9 s dispatch span at 64 servers, so the "
        "0.3 s it takes to start 64 streams is not most of what is measured; with --light: from "
        "--device-seconds)",
    )
    parser.add_argument("--light", action="store_true",
                        help="simulated devices many to a process (bench/sim_devices.py) instead of a process each")
    parser.add_argument("--sim-processes", type=int, default=1, help="--light: processes hosting the devices")
    parser.add_argument("--sweep-ms", default="",
                        help="--light: per-row times (ms, comma-separated) to run the largest size at, too")
    parser.add_argument("--device-seconds", type=float, default=10.0,
                        help="--light: rows per server = this / ms-per-row (at least 3 chunks and 4 requests, whole chunks)")
    parser.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.servers, args.rows_per_server = ("16" if args.light else "2"), 512
    if args.rows_per_server is None and not args.light:
        args.rows_per_server = 4096
    return args


def rows_per_server(args: argparse.Namespace, ms_per_row: float) -> int:
    """--rows-per-server, or (--light) each device's --device-seconds of work, whole chunks."""
    if args.rows_per_server:
        return args.rows_per_server
    # at least 3 chunks a server: with one, the queue is empty from the start and the whole level
    # is the tail (every idle server stealing requests), not the steady state measured here
    rows = max(int(args.device_seconds / (ms_per_row / 1000)), 4 * args.batch, 3 * args.chunk_rows)
    return -(-rows // args.chunk_rows) * args.chunk_rows


async def model_seconds(addresses: list[str]) -> np.ndarray:
    """Per server: (predict calls, seconds spent in predict) so far, from ModelStatistics."""
    from tensorfleet.client import AsyncInferenceClient

    async def one(address: str) -> tuple[int, float]:
        async with AsyncInferenceClient(address) as client:
            stats = (await client.model_statistics(MODEL)).model_stats[0]
            return stats.execution_count, stats.inference_stats.compute_infer.ns / 1e9

    return np.array(await asyncio.gather(*(one(address) for address in addresses)), dtype=np.float64)


async def single_server_rate(address: str, batch: int, window: int, requests: int) -> dict:
    from tensorfleet.client import AsyncInferenceClient

    rows = np.zeros((batch, 4), np.float32)
    async with AsyncInferenceClient(address) as client:
        params = {"tensorfleet.exclusive": True}
        async for _ in client.stream(
            MODEL, ({"x": rows} for _ in range(window)), window=window, parameters=params
        ):
            pass
        before = await model_seconds([address])
        started = time.perf_counter()
        async for _ in client.stream(
            MODEL, ({"x": rows} for _ in range(requests)), window=window, parameters=params
        ):
            pass
        elapsed = time.perf_counter() - started
        calls, seconds = (await model_seconds([address]) - before)[0]
        return {"rows_per_s": requests * batch / elapsed,
                "model_ms_per_request": round(seconds / calls * 1e3, 2)}


class CpuSampler:
    """psutil samples (time.time(), user+system seconds) of one process until it exits, and its peak RSS."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, float]] = []
        self.peak_rss = 0  # bytes, the largest RSS sampled
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        import psutil

        while True:
            try:
                times = self.process.cpu_times()
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                return
            self.samples.append((time.time(), times.user + times.system))
            time.sleep(interval)

    def join(self) -> None:
        self._thread.join(10)

    def at(self, moment: float) -> float:
        stamps = [s[0] for s in self.samples]
        return float(np.interp(moment, stamps, [s[1] for s in self.samples]))


def dispatch_span(job_dir: Path) -> dict:
    """Times from the job's manifest: first lease, last commit, and what lies between."""
    db = sqlite3.connect(f"file:{job_dir / 'manifest.sqlite'}?mode=ro", uri=True)
    try:
        leases = db.execute("SELECT server, MIN(at) FROM leases GROUP BY server").fetchall()
        commits = db.execute(
            "SELECT committed_at, stop - start FROM chunks WHERE done = 1 ORDER BY committed_at"
        ).fetchall()
    finally:
        db.close()
    first_leases = sorted(at for _, at in leases)
    times = np.array([at for at, _ in commits])
    rows = np.cumsum([count for _, count in commits])
    return {
        "first": first_leases[0],
        "last": float(times[-1]),
        "chunks": len(commits),
        "rows": int(rows[-1]),
        "lease_spread_s": first_leases[-1] - first_leases[0],
    }


def _cpu_now(pids: list[int]) -> tuple[float, float, float]:
    """(machine busy seconds, machine total seconds, these processes' CPU seconds)."""
    import psutil

    machine_times = psutil.cpu_times()
    total = sum(machine_times)
    idle = machine_times.idle + getattr(machine_times, "iowait", 0.0)
    own = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        own += times.user + times.system
    return total - idle, total, own


def run_level(
    args: argparse.Namespace,
    addresses: list[str],
    workdir: Path,
    per_server: dict,
    pids: list[int],
) -> dict:
    import subprocess

    count = len(addresses)
    rows = count * rows_per_server(args, args.ms_per_row)
    data = workdir / f"input-{count}.npy"
    np.save(data, np.arange(rows * 4, dtype=np.float32).reshape(rows, 4))
    job = write_job(
        workdir / f"job-{count}.yaml",
        {
            "name": f"scale-{count}",
            "input": {"path": str(data)},
            "model": {"name": MODEL, "servers": addresses},
            "output": {"path": str(workdir / f"out-{count}.h5")},
            "chunking": {"batch_rows": args.batch, "chunk_rows": args.chunk_rows},
            "policy": {"window": args.window, "shared_memory": not args.light},
        },
    )
    job_dir = workdir / f"out-{count}.h5.tfjob"
    model_before = asyncio.run(model_seconds(addresses))
    before = _cpu_now(pids)
    started = time.perf_counter()
    process = subprocess.Popen(
        tensorfleet_command("run", str(job)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sampler = CpuSampler(process.pid)
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    wall = time.perf_counter() - started
    after = _cpu_now(pids)
    model_time = asyncio.run(model_seconds(addresses)) - model_before
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"tensorfleet run exited {process.returncode}:\n{stdout}\n{stderr}")
    times = dispatch_span(job_dir)
    first, last, chunks, done = times["first"], times["last"], times["chunks"], times["rows"]
    span = last - first
    achieved = done / span
    ideal = count * per_server["rows_per_s"]
    busy = model_time[:, 1] / span
    cpu_span = sampler.at(last) - sampler.at(first)
    cpu_total = sampler.samples[-1][1] if sampler.samples else float("nan")
    data.unlink()
    return {
        "servers": count,
        "ms_per_row": args.ms_per_row,
        "rows": done,
        "chunks": chunks,
        "dispatch_s": round(span, 3),
        "command_wall_s": round(wall, 2),
        "achieved_rows_per_s": round(achieved, 1),
        "ideal_rows_per_s": round(ideal, 1),
        "busy": round(float(busy.mean()), 3),
        "least_busy_server": round(float(busy.min()), 3),
        "throughput_ratio": round(achieved / ideal, 3),
        "model_ms_per_request": round(float(model_time[:, 1].sum() / model_time[:, 0].sum() * 1e3), 2),
        "alone_model_ms_per_request": per_server["model_ms_per_request"],
        "first_lease_spread_s": round(times["lease_spread_s"], 3),
        "coordinator_cpu_s_per_chunk": round(cpu_span / chunks, 5),
        "coordinator_cpu_us_per_row": round(cpu_span / done * 1e6, 2),
        "coordinator_cpu_fraction_of_core": round(cpu_span / span, 3),
        "coordinator_cpu_total_s": round(cpu_total, 2),
        "coordinator_peak_rss_mb": round(sampler.peak_rss / 1e6, 1),
        # over the whole command: how loaded the machine was, and what the servers spent
        "machine_cpu_busy_fraction": round((after[0] - before[0]) / (after[1] - before[1]), 3),
        "servers_cpu_s_per_request": round((after[2] - before[2]) / (done / args.batch), 5),
        "servers_cpu_fraction_of_core": round((after[2] - before[2]) / wall, 3),
    }


async def warm_every_server(addresses: list[str], batch: int) -> None:
    """One stream request to each server, as a long-lived fleet has had: the first call on a
    fresh server process pays one-off costs that are not about keeping it busy."""
    from tensorfleet.client import AsyncInferenceClient

    rows = np.zeros((batch, 4), np.float32)

    async def warm(address: str) -> None:
        async with AsyncInferenceClient(address) as client:
            async for _ in client.stream(MODEL, [{"x": rows}], window=1):
                pass

    await asyncio.gather(*(warm(address) for address in addresses))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.servers.split(",")]
    if args.light:
        return light_main(args, sizes)
    overrides = {"max_batch_size": args.batch, "parameters": {"ms_per_row": args.ms_per_row}}
    with tempfile.TemporaryDirectory(prefix="tf-bench-scale-") as tmp:
        workdir = Path(tmp)
        repository = prepare_repository(workdir / "models", {MODEL: overrides})
        started = time.perf_counter()
        with fleet(repository, max(sizes), "--model", MODEL, threads=None) as servers:
            startup = time.perf_counter() - started
            addresses = [server.address for server in servers]
            per_server = measure_one_server(args, addresses)
            pids = [server.pid for server in servers]
            levels = [
                run_level(args, addresses[:size], workdir, per_server, pids[:size])
                for size in sizes
            ]
    emit(scale_record(args, startup, per_server, levels))
    return 0


def measure_one_server(args: argparse.Namespace, addresses: list[str]) -> dict:
    """One server's rate driven alone by the SDK; then every server warmed once."""
    requests = max(8, int(2.0 / (args.batch * args.ms_per_row / 1000)))  # about 2 s
    per_server = asyncio.run(single_server_rate(addresses[0], args.batch, args.window, requests))
    asyncio.run(warm_every_server(addresses, args.batch))
    return per_server


def scale_record(args: argparse.Namespace, startup: float, per_server: dict, levels: list[dict]) -> dict:
    record = {
        "bench": "scale",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "servers_kind": "simulated devices, many to a process" if args.light else "one process each",
        "ms_per_row": args.ms_per_row,
        "batch_rows": args.batch,
        "chunk_rows": args.chunk_rows,
        "window": args.window,
        "fleet_startup_s": round(startup, 1),
        "single_server_rows_per_s": round(per_server["rows_per_s"], 1),
        "nominal_rows_per_s_per_server": round(1000 / args.ms_per_row, 1),
        "levels": levels,
    }
    for level in levels:
        record[f"busy_{level['servers']}"] = level["busy"]
        record[f"throughput_ratio_{level['servers']}"] = level["throughput_ratio"]
        record[f"cpu_s_per_chunk_{level['servers']}"] = level["coordinator_cpu_s_per_chunk"]
    return record


def light_main(args: argparse.Namespace, sizes: list[int]) -> int:
    """--light: the sizes at --ms-per-row, then the largest at each --sweep-ms, one device process
    (or --sim-processes) per per-row time."""
    from bench.sim_devices import SimModel, sim_fleet

    sweep = [float(ms) for ms in args.sweep_ms.split(",") if ms]
    model = SimModel(MODEL, args.batch, "FP32", (4,), "echo")
    levels: list[dict] = []
    sweep_levels: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tf-bench-scale-") as tmp:
        for ms in [args.ms_per_row, *sweep]:
            level_args = argparse.Namespace(**{**vars(args), "ms_per_row": ms})
            workdir = Path(tmp) / f"ms-{ms}"
            workdir.mkdir()
            with sim_fleet(max(sizes), ms, model, processes=args.sim_processes) as devices:
                per_server = measure_one_server(level_args, devices.addresses)
                if ms == args.ms_per_row and not levels:
                    startup, first = devices.startup_s, per_server
                    for size in sizes:
                        levels.append(run_level(level_args, devices.addresses[:size], workdir, per_server,
                                                devices.pids))
                        print(f"scale --light: {levels[-1]}", file=sys.stderr, flush=True)
                else:
                    sweep_levels.append(run_level(level_args, devices.addresses, workdir, per_server, devices.pids))
                    print(f"scale --light sweep: {sweep_levels[-1]}", file=sys.stderr, flush=True)
    record = scale_record(args, startup, first, levels)
    record["fleet_processes"] = args.sim_processes
    if sweep_levels:
        largest = max(sizes)
        at_largest = sorted([*(lv for lv in levels if lv["servers"] == largest), *sweep_levels],
                            key=lambda lv: lv["ms_per_row"])
        record["sweep"] = sweep_levels
        for level in at_largest:
            record[f"busy_{largest}_at_{level['ms_per_row']:g}ms"] = level["busy"]
        kept = [lv["ms_per_row"] for lv in at_largest if lv["busy"] >= 0.95]
        missed = [lv["ms_per_row"] for lv in at_largest if lv["busy"] < 0.95]
        record[f"fastest_ms_per_row_kept_busy_{largest}"] = min(kept) if kept else None
        record[f"slowest_ms_per_row_missed_{largest}"] = max(missed) if missed else None
    emit(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
