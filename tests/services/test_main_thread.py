"""A CPU server process runs its models on its main thread and its event loop on another
(services/main_thread.py); a server built inside another program keeps a thread per model.

Real server subprocesses on loopback: the thread a batch ran on, model errors, the stop signals
(in flight requests answered, exit 0) and the exit status of a failed start."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import pytest

from tensorfleet.client import InferenceClient, InternalError, Unavailable
from tensorfleet.core.process import server_command
from tensorfleet.services.main_thread import MainThreadWorker
from tests.inprocess import inprocess_server
from tests.serving import REPO_ROOT, launch_server

CONFIG = """\
name: {name}
backend: python
max_batch_size: 8
inputs:
  - {{name: x, datatype: FP32, shape: [1]}}
outputs:
  - {{name: thread, datatype: BYTES, shape: [1]}}
  - {{name: loaded_on, datatype: BYTES, shape: [1]}}
batching: {{max_queue_delay_ms: 1, max_queue_size: 64}}
parameters: {{delay_ms: {delay_ms}}}
"""

MODEL = """\
import threading
import time

import numpy as np


def _where():
    thread = threading.current_thread()
    return "main" if thread is threading.main_thread() else thread.name


class Model:
    def load(self, context):
        self.loaded_on = _where()
        self.delay = float(context.parameters["delay_ms"]) / 1000

    def predict(self, inputs):
        x = inputs["x"]
        if (x < 0).any():
            raise ValueError(f"x holds a negative value: {x.min()}")
        time.sleep(self.delay)
        rows = x.shape[0]
        return {
            "thread": np.full((rows, 1), _where().encode(), dtype=object),
            "loaded_on": np.full((rows, 1), self.loaded_on.encode(), dtype=object),
        }
"""


def _repository(root: Path, *names: str, delay_ms: int = 0) -> Path:
    for name in names:
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(CONFIG.format(name=name, delay_ms=delay_ms))
        (folder / "model.py").write_text(MODEL)
    return root


def _where(client: InferenceClient, model: str, x: float = 1.0) -> tuple[str, str]:
    outputs = client.infer(model, {"x": np.array([[x]], np.float32)})
    return outputs["thread"][0, 0].decode(), outputs["loaded_on"][0, 0].decode()


def test_a_cpu_server_process_loads_and_runs_every_model_on_its_main_thread(tmp_path):
    server = launch_server(_repository(tmp_path, "first", "second"))
    try:
        with InferenceClient(server.address, shared_memory=False) as client:
            assert _where(client, "first") == ("main", "main")
            assert _where(client, "second") == ("main", "main")
    finally:
        assert server.stop() == 0


def test_a_server_built_inside_a_program_keeps_a_thread_per_model(tmp_path):
    with inprocess_server(_repository(tmp_path, "first", "second")) as server:
        with InferenceClient(server.address, shared_memory=False) as client:
            first, second = _where(client, "first"), _where(client, "second")
    assert first == ("model-first_0", "model-first_0")
    assert second == ("model-second_0", "model-second_0")


def test_a_model_error_answers_its_request_and_the_server_keeps_serving(tmp_path):
    server = launch_server(_repository(tmp_path, "where"))
    try:
        with InferenceClient(server.address, shared_memory=False) as client:
            with pytest.raises(InternalError, match="x holds a negative value: -1.0"):
                _where(client, "where", x=-1.0)
            assert _where(client, "where") == ("main", "main")
        assert server.process.poll() is None
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_drains_the_requests_in_flight_and_exits_zero(tmp_path, sig):
    server = launch_server(_repository(tmp_path, "slow", delay_ms=100))
    answers: list[tuple[str, str]] = []
    errors: list[Exception] = []
    queued = threading.Barrier(9)

    def caller() -> None:
        with InferenceClient(server.address, shared_memory=False) as client:
            queued.wait()
            try:
                outputs = client.infer("slow", {"x": np.ones((1, 1), np.float32)},
                                       parameters={"tensorfleet.exclusive": True})
                answers.append((outputs["thread"][0, 0].decode(), outputs["loaded_on"][0, 0].decode()))
            except Exception as error:  # noqa: BLE001 - asserted below
                errors.append(error)

    try:
        callers = [threading.Thread(target=caller) for _ in range(8)]
        for thread in callers:
            thread.start()
        queued.wait()
        _wait_for_queued(server.address, "slow")
        server.process.send_signal(sig)
        for thread in callers:
            thread.join(60)
        code = server.process.wait(60)
    finally:
        server.stop()
    # requests that reached the server ran to the end, on the main thread; late ones were turned away
    assert all(isinstance(e, Unavailable) and "draining" in str(e) for e in errors), errors
    assert answers and all(answer == ("main", "main") for answer in answers)
    assert len(answers) + len(errors) == 8
    assert code == 0
    log = server.log()
    assert "draining" in log and "stopped" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log


def _wait_for_queued(address: str, model: str) -> None:
    import grpc

    from tensorfleet.protos import tensorfleet_pb2, tensorfleet_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = tensorfleet_pb2_grpc.ServerControlStub(channel)
        for _ in range(3000):
            info = stub.GetServerInfo(tensorfleet_pb2.GetServerInfoRequest())
            if sum(m.queue_depth for m in info.models if m.name == model) >= 2:
                return
            threading.Event().wait(0.01)
    raise AssertionError("requests never queued up")


def test_a_failed_start_exits_with_the_status_it_had(tmp_path):
    """An error of the loop thread (here a model that fails to load, with --exit-on-load-error)
    ends the main thread's work and the process as before: status 2, the reason on stderr."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text(CONFIG.format(name="broken", delay_ms=0))
    (broken / "model.py").write_text("raise ImportError('this model cannot load')\n")
    command = server_command("--model-repository", str(tmp_path), "--exit-on-load-error",
                             port_file=tmp_path / "port")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 2, result.stderr
    assert "model 'broken' failed to load" in result.stderr and "this model cannot load" in result.stderr
    assert not (tmp_path / "port").exists()


WAKE_PROBE = """
import asyncio, sys
from tensorfleet.services import main_thread
main_thread.IDLE_WAKE_S = 3600.0  # only the signal itself can wake the waiting main thread
worker = main_thread.MainThreadWorker()

async def main():
    stopped = asyncio.Event()
    worker.stop_on_signals(stopped.set)
    print("waiting", flush=True)
    await stopped.wait()
    return 7

sys.exit(worker.run_beside_loop(main))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_wakes_the_main_thread_waiting_for_work(sig):
    process = subprocess.Popen([sys.executable, "-c", WAKE_PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=REPO_ROOT)
    try:
        assert process.stdout.readline() == "waiting\n"
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 7, stderr


# --- the executor itself ----------------------------------------------------------------


def test_the_worker_runs_in_order_and_hands_each_outcome_to_its_future():
    worker = MainThreadWorker()
    ran: list[int] = []
    first = worker.submit(ran.append, 1)
    failing = worker.submit(int, "not a number")
    interrupted = worker.submit(_raise, KeyboardInterrupt())
    cancelled = worker.submit(ran.append, 99)
    cancelled.cancel()
    last = worker.submit(lambda: ran.append(3) or "done")
    worker.shutdown(wait=False)
    worker.run()  # returns once the work queued before the shutdown ran
    assert ran == [1, 3]
    assert first.result() is None and last.result() == "done"
    with pytest.raises(ValueError, match="invalid literal for int"):
        failing.result()
    with pytest.raises(KeyboardInterrupt):
        interrupted.result()
    with pytest.raises(CancelledError):
        cancelled.result()
    with pytest.raises(RuntimeError, match="after shutdown"):
        worker.submit(ran.append, 4)


def test_shutdown_with_cancel_futures_drops_the_queued_work():
    worker = MainThreadWorker()
    queued = worker.submit(lambda: "ran")
    worker.shutdown(wait=False, cancel_futures=True)
    worker.run()
    assert queued.cancelled()


def _raise(error: BaseException) -> None:
    raise error
