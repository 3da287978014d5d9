"""The SDK's automatic shared memory against a real server on loopback (client/shared_memory.py,
services/shared_memory.py): same bytes as over gRPC, ordered streams, per-request errors,
outputs larger than their window, bounds, and cleanup when a client closes or dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest

from tensorfleet.client import InferenceClient, InvalidArgument
from tensorfleet.protos import inference_pb2 as pb
from tensorfleet.protos import inference_pb2_grpc as pb_grpc
from tests.serving import REPO_ROOT, running_server

CONFIG = """\
name: grow
backend: python
max_batch_size: 4
inputs:
  - {name: x, datatype: FP32, shape: [-1]}
outputs:
  - {name: same, datatype: FP32, shape: [-1]}
  - {name: triple, datatype: FP32, shape: [-1]}
batching: {max_queue_delay_ms: 1}
"""

MODEL = """\
import numpy as np


class Model:
    def load(self, context):
        pass

    def predict(self, inputs):
        x = inputs["x"]
        return {"same": x * 1.0, "triple": np.concatenate([x, -x, x + 1], axis=1)}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("shm_repo")
    (root / "grow").mkdir()
    (root / "grow" / "config.yaml").write_text(CONFIG)
    (root / "grow" / "model.py").write_text(MODEL)
    with running_server(root, "--shared-memory-max-bytes", str(64 << 20)) as process:
        yield process


def regions(address: str) -> dict[str, pb.SystemSharedMemoryStatusResponse.RegionStatus]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return dict(stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions)


def own_objects(pid: int) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"tensorfleet-{pid}-")]


def expected(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"same": x * 1.0, "triple": np.concatenate([x, -x, x + 1], axis=1)}


def test_large_tensors_go_through_shared_memory_bitwise_equal(server) -> None:
    x = np.random.default_rng(1).standard_normal((2, 100_000)).astype(np.float32)
    with InferenceClient(server.address) as client, InferenceClient(server.address, shared_memory=False) as plain:
        shared = client.infer("grow", {"x": x})
        assert any(name.startswith(f"tensorfleet-{os.getpid()}-") for name in regions(server.address))
        again = client.infer("grow", {"x": x})  # `triple` did not fit its window the first time
        over_grpc = plain.infer("grow", {"x": x})
    for name, want in expected(x).items():
        for got in (shared[name], again[name], over_grpc[name]):
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_client_close_unregisters_and_unlinks(server) -> None:
    x = np.ones((1, 50_000), np.float32)
    client = InferenceClient(server.address)
    client.infer("grow", {"x": x}, outputs=["same"])
    assert own_objects(os.getpid())
    client.close()
    assert own_objects(os.getpid()) == []
    assert not [name for name in regions(server.address) if name.startswith(f"tensorfleet-{os.getpid()}-")]


def test_stream_is_ordered_and_errors_stay_per_request(server) -> None:
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((2, 20_000 + 1000 * i)).astype(np.float32) for i in range(12)]
    requests = [{"x": b} for b in batches]
    requests[5] = {"x": np.ones((2, 20_000), np.float64)}  # wrong datatype: fails alone
    with InferenceClient(server.address) as client:
        results = list(client.stream("grow", requests, window=4, return_exceptions=True))
        names = [name for name in regions(server.address) if name.startswith(f"tensorfleet-{os.getpid()}-")]
    assert isinstance(results[5], InvalidArgument)
    for index, (batch, result) in enumerate(zip(batches, results, strict=True)):
        if index == 5:
            continue
        for name, want in expected(batch).items():
            assert result[name].tobytes() == want.tobytes(), (index, name)
    assert 1 <= len(names) <= 4 + 2  # slots are reused: about one per request in flight


def test_small_requests_stay_on_grpc(server) -> None:
    with InferenceClient(server.address) as client:
        before = set(regions(server.address))
        client.infer("grow", {"x": np.ones((1, 16), np.float32)})
        assert set(regions(server.address)) == before


def test_registered_bytes_are_bounded(server) -> None:
    too_big = np.ones((1, 20 << 20), np.float32)  # 80 MB in and out: over the 64 MB bound
    with InferenceClient(server.address) as client:
        out = client.infer("grow", {"x": too_big}, outputs=["same"])  # the SDK falls back to gRPC
        assert out["same"].tobytes() == too_big.tobytes()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="huge", key="/tensorfleet-bound-test", byte_size=65 << 20))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "huge" in caught.value.details()


CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from tensorfleet.client import InferenceClient
    client = InferenceClient(sys.argv[1])
    client.infer("grow", {"x": np.ones((1, 50_000), np.float32)})
    print("registered", flush=True)
    time.sleep(60)
""")


def test_regions_of_a_killed_client_are_swept(server) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, server.address], stdout=subprocess.PIPE,
                             text=True, cwd=REPO_ROOT)
    try:
        assert child.stdout.readline().strip() == "registered"
        assert own_objects(child.pid)
        assert any(name.startswith(f"tensorfleet-{child.pid}-") for name in regions(server.address))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and own_objects(child.pid):
        time.sleep(0.1)  # the server sweeps by itself every SWEEP_INTERVAL_S (2 s)
    assert own_objects(child.pid) == []
    assert not any(name.startswith(f"tensorfleet-{child.pid}-") for name in regions(server.address))
    assert own_objects(child.pid) == []


async def test_async_client_infer_and_stream_through_shared_memory(server) -> None:
    from tensorfleet.client import AsyncInferenceClient

    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((1, 30_000 + 7 * i)).astype(np.float32) for i in range(6)]
    async with AsyncInferenceClient(server.address) as client:
        single = await client.infer("grow", {"x": batches[0]})
        streamed = [out async for out in client.stream("grow", ({"x": b} for b in batches), window=3)]
        assert any(name.startswith(f"tensorfleet-{os.getpid()}-") for name in regions(server.address))
    assert single["triple"].tobytes() == expected(batches[0])["triple"].tobytes()
    for batch, out in zip(batches, streamed, strict=True):
        for name, want in expected(batch).items():
            assert out[name].tobytes() == want.tobytes()
    assert own_objects(os.getpid()) == []


def test_a_server_that_lost_the_regions_is_registered_again(server) -> None:
    """As after a server restart: the next call registers its slot again instead of failing."""
    x = np.arange(40_000, dtype=np.float32).reshape(1, -1)
    with InferenceClient(server.address) as client:
        client.infer("grow", {"x": x}, outputs=["same"])
        with grpc.insecure_channel(server.address) as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).SystemSharedMemoryUnregister(
                pb.SystemSharedMemoryUnregisterRequest())
        assert client.infer("grow", {"x": x}, outputs=["same"])["same"].tobytes() == x.tobytes()
        assert any(name.startswith(f"tensorfleet-{os.getpid()}-") for name in regions(server.address))
