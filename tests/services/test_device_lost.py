"""A device that fails (CUDA's illegal address, a device-side assert, a GPU off the bus) fails
every later batch too: the server answers UNAVAILABLE, turns NOT_SERVING and exits with
EXIT_DEVICE_LOST for its supervisor to start it afresh, instead of failing every row it is sent
as the rows' fault. Simulated on the CPU by the test embedder (TF_TEST_DEVICE_FAIL_FILE)."""

from __future__ import annotations

import numpy as np
import pytest

from tensorfleet.client import InferenceClient, InternalError, Unavailable
from tensorfleet.services.backends.base import OutOfMemory, is_device_lost
from tensorfleet.services.server import EXIT_DEVICE_LOST
from tests.serving import REPO_ROOT, launch_server

MODELS = REPO_ROOT / "tests" / "coordinator" / "models"


@pytest.mark.parametrize(("error", "lost"), [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA error: device-side assert triggered"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (OutOfMemory("batch too large"), False),
    (ValueError("poison row: sequence holds '!'"), False),
])
def test_which_errors_mean_the_device_failed(error, lost):
    assert is_device_lost(error) is lost


def test_a_failed_device_answers_unavailable_and_the_server_exits_to_be_restarted(tmp_path):
    trigger = tmp_path / "fail-now"
    server = launch_server(MODELS, "--model", "embed", env={"TF_TEST_DEVICE_FAIL_FILE": str(trigger)})
    try:
        sequence = {"sequence": np.array([b"MKVLAAGIV"], dtype=object)}
        with InferenceClient(server.address, shared_memory=False) as client:
            assert client.infer("embed", sequence)["embedding"].shape == (1, 16)
            trigger.write_text("")
            with pytest.raises(Unavailable, match="the device failed .*CUDA error: an illegal memory access"):
                client.infer("embed", sequence)
        assert server.process.wait(timeout=60) == EXIT_DEVICE_LOST
        log = server.log_path.read_text()
        assert f"stopping, exit {EXIT_DEVICE_LOST}, to be started afresh" in log
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_a_model_error_that_is_not_the_device_stays_the_rows_and_the_server_stays_up():
    """Control: a row's own error is INTERNAL for that request; the server keeps serving."""
    server = launch_server(MODELS, "--model", "embed")
    try:
        with InferenceClient(server.address, shared_memory=False) as client:
            with pytest.raises(InternalError, match="poison row"):
                client.infer("embed", {"sequence": np.array([b"MK!V"], dtype=object)})
            assert client.infer("embed", {"sequence": np.array([b"MKV"], dtype=object)})["embedding"].shape == (1, 16)
        assert server.process.poll() is None
    finally:
        server.process.kill()
        server.process.wait()
