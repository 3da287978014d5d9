"""What REST costs next to gRPC on the same server, through the same batcher, for 1 MB tensors.

One server with REST on (`--http-port`), one identity model with a batch dimension (so every
request goes through the dynamic batcher). Per round, each side sends the same tensor
`--requests` times, one after another on one connection:

(a) gRPC: `InferenceClient.infer` (unary ModelInfer, raw buffers over the wire: shared memory,
    which the SDK would use on loopback, is off, as REST has none);
(b) REST: POST /v2/models/{name}/infer with the binary tensor data extension (JSON header,
    then the raw tensor; the output asked for as binary), over one keep-alive connection of
    Python's own http.client.

The sides alternate for --rounds rounds; each reply is checked (bytes equal to the input).
Besides wall time, the server process's CPU time (user + system, from /proc) is summed per
side: on a shared, loaded machine that is the steadier measure of what each request costs the
server. Prints one JSON line: `ratio_rest_over_grpc` is REST's wall time over gRPC's and
`ratio_rest_over_grpc_server_cpu` the same for server CPU (target: <= 1.10).

    python -m bench.rest                    # 1 MB, 200 requests a side, 3 rounds
    python -m bench.rest --mb 16 --requests 50

`--sequential` (issue 30) measures what a client nobody here wrote sees, one request in flight:
Triton's tritonclient.http against tritonclient.grpc (bench/rest_clients.py, in a process of
its own), and Triton's perf_analyzer `-i http` against `-i grpc` at concurrency 1 (from
`.venv-perf`, `make perf-analyzer`; skipped, saying so, without it), on the `simple` test
model and on the identity model at 64 B, 4 KB and 1 MB. `ratio_http_over_grpc_median` per row
(target: <= 2; it was 24 while every REST response waited 44 ms for a delayed ACK).

    python -m bench.rest --sequential       # 200 calls a side, 3 rounds, per case
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import glob
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import REPO_ROOT, emit, machine, server_process
from bench.fleet import prepare_repository

MB = 1024 * 1024
MODEL = "identity_fp32"
HEADER_LENGTH = "Inference-Header-Content-Length"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1, help="tensor size in MB")
    parser.add_argument("--requests", type=int, default=200, help="requests per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sequential", action="store_true",
                        help="tritonclient and perf_analyzer, HTTP vs gRPC, one request in flight, 64 B to 1 MB")
    parser.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds = 10, 1
    return args


class RestClient:
    """The binary tensor data extension by hand, on one keep-alive connection."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=120)
        self.connection.connect()  # no Nagle: the JSON header must not wait for an ACK (gRPC sets this too)
        self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        header = json.dumps({
            "inputs": [{"name": "x", "datatype": "FP32", "shape": list(tensor.shape),
                        "parameters": {"binary_data_size": tensor.nbytes}}],
            "parameters": {"binary_data_output": True},
        }).encode()  # fmt: skip
        self.connection.putrequest("POST", f"/v2/models/{MODEL}/infer")
        self.connection.putheader("Content-Type", "application/octet-stream")
        self.connection.putheader(HEADER_LENGTH, str(len(header)))
        self.connection.putheader("Content-Length", str(len(header) + tensor.nbytes))
        self.connection.endheaders(header)  # HTTP headers and the JSON header in one send
        self.connection.send(memoryview(tensor).cast("B"))
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"REST infer: {response.status} {body[:500]!r}")
        size = int(response.getheader(HEADER_LENGTH))
        output = json.loads(body[:size])["outputs"][0]
        return np.frombuffer(body, np.float32, offset=size).reshape(output["shape"])

    def close(self) -> None:
        self.connection.close()


def cpu_seconds(pid: int) -> float:
    """CPU time of a process's threads so far: nanoseconds from each thread's schedstat (Linux),
    so that a short run still measures; whole clock ticks from stat where there is none."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    total, measured = 0, False
    for task in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
            measured = True
    if measured:
        return total / 1e9
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(args: argparse.Namespace, grpc_address: str, rest_address: str, server_pid: int) -> dict:
    from tensorfleet.client import InferenceClient

    elements = args.mb * MB // 4
    tensor = np.random.default_rng(0).standard_normal((1, elements)).astype(np.float32)
    seconds = {"grpc": 0.0, "rest": 0.0}
    cpu = {"grpc": 0.0, "rest": 0.0}
    with InferenceClient(grpc_address, shared_memory=False) as grpc_client:
        rest = RestClient(rest_address)
        try:
            sides = {
                "grpc": lambda: grpc_client.infer(MODEL, {"x": tensor})["y"],
                "rest": lambda: rest.infer(tensor),
            }
            for call in sides.values():  # warm both paths and check them once
                assert call().tobytes() == tensor.tobytes()
            for _ in range(args.rounds):
                for side, call in sides.items():
                    started, used = time.perf_counter(), cpu_seconds(server_pid)
                    for _ in range(args.requests):
                        out = call()
                    seconds[side] += time.perf_counter() - started
                    cpu[side] += max(cpu_seconds(server_pid) - used, 0.0)  # a thread that ended takes its time along
                    assert out.shape == tensor.shape and out.tobytes() == tensor.tobytes(), side
        finally:
            rest.close()
    count = args.requests * args.rounds
    return {
        "grpc_ms_per_request": round(1000 * seconds["grpc"] / count, 3),
        "rest_ms_per_request": round(1000 * seconds["rest"] / count, 3),
        "ratio_rest_over_grpc": round(seconds["rest"] / seconds["grpc"], 3),
        "grpc_server_cpu_ms_per_request": round(1000 * cpu["grpc"] / count, 3),
        "rest_server_cpu_ms_per_request": round(1000 * cpu["rest"] / count, 3),
        "ratio_rest_over_grpc_server_cpu": round(cpu["rest"] / cpu["grpc"], 3) if cpu["grpc"] else None,
    }


#: (label, model, FP32 elements per input) of the sequential rows.
SEQUENTIAL_CASES = [("simple", "simple", 16), ("64 B", MODEL, 16), ("4 KB", MODEL, 1024), ("1 MB", MODEL, MB // 4)]
PERF_ANALYZER = Path(os.environ.get("TENSORFLEET_PERF_ANALYZER", REPO_ROOT / ".venv-perf" / "bin" / "perf_analyzer"))


def tritonclient_rows(args: argparse.Namespace, grpc_address: str, rest_address: str) -> dict:
    command = [sys.executable, str(REPO_ROOT / "bench" / "rest_clients.py"), "--http", rest_address,
               "--grpc", grpc_address, "--requests", str(args.requests), "--rounds", str(args.rounds)]
    for _label, model, elements in SEQUENTIAL_CASES:
        command += ["--case", f"{model}:{elements}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench/rest_clients.py failed:\n{done.stderr[-3000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {label: found[f"{model}:{elements}"] for label, model, elements in SEQUENTIAL_CASES}


def perf_analyzer_rows(args: argparse.Namespace, grpc_address: str, rest_address: str, tmp: Path) -> dict:
    """perf_analyzer at concurrency 1 both ways, per case: p50 latency (ms) and inferences/s, the
    median of `--rounds` runs a side, the runs taking turns (http, grpc, http, ...)."""
    if not PERF_ANALYZER.exists():
        return {"skipped": f"perf_analyzer is not installed at {PERF_ANALYZER} (make perf-analyzer)"}
    libs = glob.glob(str(PERF_ANALYZER.parents[1] / "lib" / "python3*" / "site-packages" / "nvidia" / "cuda_runtime" / "lib"))
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join([*libs, os.environ.get("LD_LIBRARY_PATH", "")])}
    runs: dict = {}
    for label, model, elements in SEQUENTIAL_CASES:
        for run, (protocol, address) in enumerate([("http", rest_address), ("grpc", grpc_address)] * args.rounds):
            report = tmp / f"perf-{model}-{elements}-{protocol}-{run}.csv"
            shape = [] if model == "simple" else ["--shape", f"x:{elements}"]
            done = subprocess.run(
                [str(PERF_ANALYZER), "-m", model, "-u", address, "-i", protocol, *shape,
                 "--concurrency-range", "1", "--measurement-mode", "count_windows",
                 "--measurement-request-count", str(max(20, args.requests)), "--max-trials", "3",
                 "--stability-percentage", "100000", "-f", str(report)],  # load must not fail the run
                capture_output=True, text=True, timeout=600, env=env, check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"perf_analyzer -i {protocol} on {model}: {(done.stdout + done.stderr)[-3000:]}")
            found = next(csv.DictReader(report.open()))
            runs.setdefault(label, {}).setdefault(protocol, []).append(
                (float(found["p50 latency"]) / 1000, float(found["Inferences/Second"])))
    rows: dict = {}
    for label, sides in runs.items():  # the median run of each side (runs alternate http, grpc)
        row: dict = {side: {"p50_ms": round(statistics.median(p50 for p50, _ in found), 3),
                            "infer_per_s": round(statistics.median(rate for _, rate in found), 1),
                            "runs": len(found)} for side, found in sides.items()}
        row["ratio_http_over_grpc_p50"] = round(row["http"]["p50_ms"] / row["grpc"]["p50_ms"], 3)
        rows[label] = row
    return rows


def sequential(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="tf-bench-rest-seq-") as tmp:
        repository = prepare_repository(Path(tmp) / "models", {MODEL: None})
        shutil.copytree(REPO_ROOT / "tests" / "models" / "simple", repository / "simple")
        port_file = Path(tmp) / "http-port"
        with server_process(
            repository, "--model", MODEL, "--model", "simple", "--log-level", "WARNING",
            "--http-port", "0", "--http-port-file", str(port_file), threads=1,
        ) as server:  # fmt: skip
            rest_address = f"127.0.0.1:{port_file.read_text().strip()}"
            clients = tritonclient_rows(args, server.address, rest_address)
            perf = perf_analyzer_rows(args, server.address, rest_address, Path(tmp))
    emit({
        "bench": "rest-sequential",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load": os.getloadavg()[0],
        "calls_per_side_and_round": args.requests,
        "rounds": args.rounds,
        "tritonclient": clients,
        "perf_analyzer": perf,
    })  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sequential:
        return sequential(args)
    elements = args.mb * MB // 4
    batched = {  # a batch dimension, so each request goes through the dynamic batcher
        "max_batch_size": 8,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [elements]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [elements]}],
    }
    with tempfile.TemporaryDirectory(prefix="tf-bench-rest-") as tmp:
        repository = prepare_repository(Path(tmp) / "models", {MODEL: batched})
        port_file = Path(tmp) / "http-port"
        with server_process(
            repository, "--model", MODEL, "--log-level", "WARNING",
            "--http-port", "0", "--http-port-file", str(port_file), threads=1,
        ) as server:  # fmt: skip
            rest_address = f"127.0.0.1:{port_file.read_text().strip()}"
            result = measure(args, server.address, rest_address, server.pid)
    emit({
        "bench": "rest",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "mb": args.mb,
        "requests_per_side_and_round": args.requests,
        "rounds": args.rounds,
        **result,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
