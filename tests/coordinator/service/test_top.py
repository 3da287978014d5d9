"""`tensorfleet top` for real: model servers and a coordinator service on loopback, the CLI as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading

import numpy as np
import pytest

from tensorfleet.client import InferenceClient
from tensorfleet.coordinator.service.gpus import gpu_of, is_local
from tests.coordinator.helpers import (
    REPO_ROOT,
    make_fasta,
    run_tensorfleet,
    tensorfleet_command,
    write_job,
)
from tests.serving import running_server

from .helpers import running_coordinator

TEST_MODELS = REPO_ROOT / "tests" / "models"


def top_once(*args: str) -> tuple[int, str, str]:
    result = run_tensorfleet("top", "--once", *args, timeout=60)
    return result.returncode, result.stdout, result.stderr


def top_json(*args: str) -> dict:
    code, out, err = top_once("--json", *args)
    assert code == 0, err + out
    return json.loads(out)


@contextlib.contextmanager
def load(address: str):
    """Keep slow_identity busy: 16 requests of 128 rows in flight, each one batch of 50 ms."""
    stop = threading.Event()

    def requests():
        while not stop.is_set():
            yield {"x": np.ones((128, 2), np.float32)}

    def drive():
        with InferenceClient(address) as client:
            for _ in client.stream("slow_identity", requests(), window=16):
                pass

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


@pytest.fixture(scope="module")
def model_servers():
    with running_server(TEST_MODELS) as first, running_server(TEST_MODELS) as second:
        yield [first, second]


def test_servers_once_json_shows_both_servers_models_and_queue_depth(model_servers):
    first, second = model_servers
    names = sorted(p.name for p in TEST_MODELS.iterdir() if (p / "config.yaml").exists())
    with load(first.address):
        # The load is running; poll until a snapshot catches requests waiting in the queue.
        for _ in range(30):
            snapshot = top_json("--servers", f"{first.address},{second.address}")
            busy = next(s for s in snapshot["servers"] if s["address"] == first.address)
            if busy["queue_depth"] > 0:
                break
        else:
            pytest.fail(f"no snapshot showed a queue on {first.address}: {busy}")
    assert [s["address"] for s in snapshot["servers"]] == [first.address, second.address]
    assert snapshot["jobs"] == [] and snapshot["errors"] == []
    for server, process in zip(snapshot["servers"], model_servers, strict=True):
        assert server["reachable"] and server["sources"] == ["direct"]
        assert (server["device"], server["pid"]) == ("cpu", process.pid)
        assert sorted(m["name"] for m in server["models"]) == names
        assert {m["state"] for m in server["models"]} == {"READY"}
        assert server["gpu"] is None  # a CPU server: no NVML figures, whether or not pynvml is there
    slow = next(m for m in busy["models"] if m["name"] == "slow_identity")
    assert slow["queue_depth"] == busy["queue_depth"] > 0
    assert slow["rows_done"] > 0
    idle = next(s for s in snapshot["servers"] if s["address"] == second.address)
    assert idle["queue_depth"] == 0 and all(m["rows_done"] == 0 for m in idle["models"])


def test_live_json_lines_derive_rows_per_second_between_refreshes(model_servers):
    first, _ = model_servers
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = tensorfleet_command("top", "--servers", first.address, "--interval", "0.3", "--json")
    with load(first.address):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
        try:
            lines = [json.loads(process.stdout.readline()) for _ in range(3)]
        finally:
            os.kill(process.pid, signal.SIGINT)
            code = process.wait(30)
            process.stdout.close()
    assert code == 0  # Ctrl-C ends the live view cleanly
    rates = [next(m for m in line["servers"][0]["models"] if m["name"] == "slow_identity")["rows_per_second"]
             for line in lines]
    assert rates[0] is None  # one sample: no rate yet
    assert all(rate is not None and rate >= 0 for rate in rates[1:])
    assert max(rates[1:]) > 0
    assert lines[0]["time"] < lines[1]["time"] < lines[2]["time"]


def test_text_view_lists_servers_and_an_unreachable_one(model_servers):
    first, _ = model_servers
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    code, out, _ = top_once("--servers", f"{first.address},{closed}")
    assert code == 2  # a source did not answer
    assert "servers: 1/2 up" in out
    assert f"! server {closed}: UNAVAILABLE" in out
    lines = out.splitlines()
    assert any(line.startswith(first.address) and "cpu" in line for line in lines)
    assert any(line.startswith(closed) and "unreachable" in line for line in lines)
    assert any("slow_identity READY" in line for line in lines)


def test_coordinator_jobs_and_servers_appear(tmp_path, servers):
    addresses = [s.address for s in servers]
    folder = tmp_path / "job"
    folder.mkdir()
    make_fasta(folder / "in.fasta", 300)
    job_file = write_job(
        folder / "job.yaml", input={"path": "in.fasta"}, model={"name": "embed", "servers": addresses},
        output={"path": "out.h5"}, chunking={"chunk_rows": 32, "batch_rows": 8},
    )
    with running_coordinator(tmp_path / "state", "--servers", ",".join(addresses)) as coordinator:
        with coordinator.client() as client:
            done = client.wait(client.submit(job_file).job_id)
        snapshot = top_json("--coordinator", coordinator.address, "--servers", addresses[0])
        code, text, _ = top_once("--coordinator", coordinator.address)
    assert snapshot["errors"] == []
    (job,) = snapshot["jobs"]
    assert (job["job_id"], job["state"], job["name"]) == (done.job_id, "SUCCEEDED", "test")
    assert (job["rows"], job["rows_done"], job["rows_failed"], job["progress"]) == (300, 300, 0, 1.0)
    assert job["chunks_done"] == job["chunks"] == 10
    by_address = {s["address"]: s for s in snapshot["servers"]}
    assert sorted(by_address) == sorted(addresses)
    assert by_address[addresses[0]]["sources"] == ["coordinator", "direct"]
    assert by_address[addresses[1]]["sources"] == ["coordinator"]
    for server in by_address.values():
        assert server["reachable"]
        embed = next(m for m in server["models"] if m["name"] == "embed")
        assert embed["queue_depth"] == 0 and embed["state"] == "READY"
    # The job's 300 rows were computed by the two servers.
    assert sum(next(m for m in s["models"] if m["name"] == "embed")["rows_done"] for s in by_address.values()) >= 300
    assert code == 0
    assert done.job_id in text and "SUCCEEDED" in text and "300/300" in text and "100.0%" in text
    assert all(address in text for address in addresses)


def test_unreachable_coordinator_exits_2_with_its_error(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    code, out, _ = top_once("--json", "--coordinator", closed)
    assert code == 2
    snapshot = json.loads(out)
    assert snapshot["jobs"] == [] and snapshot["servers"] == []
    assert snapshot["errors"] and snapshot["errors"][0].startswith(f"coordinator {closed}:")


def test_nvml_figures_attach_only_to_a_local_server_on_that_gpu():
    gpu = {"index": 1, "name": "GPU X", "utilization": 87, "memory_used": 5 << 30, "memory_total": 80 << 30,
           "pids": [os.getpid()]}
    local = {"address": "127.0.0.1:8001", "pid": os.getpid(), "device": "cuda:0"}
    assert gpu_of(local, [gpu]) == {k: gpu[k] for k in ("index", "name", "utilization", "memory_used", "memory_total")}
    assert gpu_of({**local, "pid": os.getpid() + 1_000_000}, [gpu]) is None  # another process's GPU
    assert gpu_of({**local, "device": "cpu"}, [gpu]) is None
    assert gpu_of({**local, "address": "192.0.2.1:8001"}, [gpu]) is None  # same pid number, other host
    assert is_local("127.0.0.1:1") and is_local("localhost:8001") and not is_local("192.0.2.1:8001")



FAKE_PYNVML = '''
"""Stands in for nvidia-ml-py's pynvml: one GPU running the process named by FAKE_GPU_PID."""
import os


class NVMLError(Exception):
    pass


class _Record:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def nvmlInit():
    pass


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return 1


def nvmlDeviceGetHandleByIndex(index):
    return index


def nvmlDeviceGetName(handle):
    return b"Fake GPU"


def nvmlDeviceGetUtilizationRates(handle):
    return _Record(gpu=42, memory=7)


def nvmlDeviceGetMemoryInfo(handle):
    return _Record(used=3 << 30, total=16 << 30, free=13 << 30)


def nvmlDeviceGetComputeRunningProcesses(handle):
    return [_Record(pid=int(os.environ["FAKE_GPU_PID"]), usedGpuMemory=1 << 30)]


def nvmlDeviceGetGraphicsRunningProcesses(handle):
    raise NVMLError("Not Supported")
'''


def test_gpus_come_from_pynvml_when_it_is_importable(tmp_path, model_servers):
    first, _ = model_servers
    (tmp_path / "pynvml.py").write_text(FAKE_PYNVML)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "FAKE_GPU_PID": str(first.pid)}
    result = run_tensorfleet("top", "--once", "--json", "--servers", first.address, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["gpus"] == [{"index": 0, "name": "Fake GPU", "utilization": 42, "memory_used": 3 << 30,
                                 "memory_total": 16 << 30, "pids": [first.pid]}]
    assert snapshot["servers"][0]["gpu"] is None  # its pid is on the GPU, but it serves on the CPU
    text = run_tensorfleet("top", "--once", "--servers", first.address, env=env, timeout=60).stdout
    assert any(line.split()[:3] == ["0", "Fake", "GPU"] and "42%" in line and "3.0/16.0 GiB" in line
               for line in text.splitlines())
