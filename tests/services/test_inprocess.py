"""The in-process server fixture serves the real stack and leaves nothing running behind it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tensorfleet.client import AsyncInferenceClient, InferenceClient
from tensorfleet.core.errors import NotFound
from tests.inprocess import inprocess_server

MODELS = Path(__file__).resolve().parents[1] / "models"


def _model_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("model-", "inprocess-server"))]


async def test_sync_and_async_clients_reach_it_and_stopping_ends_its_threads() -> None:
    before = _model_threads()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with inprocess_server(MODELS, "flaky_rows") as server:
        assert server.alive() and server.port > 0
        with InferenceClient(server.address) as client:  # blocks this thread; the server has its own loop
            client.wait_until_ready(30, model="flaky_rows")
            np.testing.assert_array_equal(client.infer("flaky_rows", {"x": x})["y"], x * 2)
            with pytest.raises(NotFound):
                client.infer("no_such_model", {"x": x})
        async with AsyncInferenceClient(server.address) as client:
            np.testing.assert_array_equal((await client.infer("flaky_rows", {"x": x}))["y"], x * 2)
        assert "SERVING on port" in server.log()
    assert not server.alive()
    deadline = time.monotonic() + 10  # model threads end once their current work is done
    while set(_model_threads()) - set(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(_model_threads()) - set(before) == set()  # (another test's may end meanwhile)
