"""`shared_stream=True` on both clients: many infer calls as messages on one stream, to a
real server on loopback."""

import asyncio
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tensorfleet.client import (
    AsyncInferenceClient,
    DeadlineExceeded,
    InferenceClient,
    TensorfleetError,
    Unavailable,
)
from tests.inprocess import inprocess_server
from tests.serving import launch_server

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def server():
    with inprocess_server(MODELS) as process:
        yield process


def no_unary_calls(client: AsyncInferenceClient) -> list:
    """Record any unary ModelInfer the client makes (there should be none)."""
    made = []
    unary = client._infer

    def counting(*args, **kwargs):
        made.append(args)
        return unary(*args, **kwargs)

    client._infer = counting
    return made


async def test_concurrent_calls_share_one_stream_and_each_gets_its_own_rows(server):
    async with AsyncInferenceClient(server.address, shared_stream=True) as client:
        unary = no_unary_calls(client)
        before = (await client.model_statistics("slow_identity")).model_stats[0]
        rows = [np.array([[i, -i]], dtype=np.float32) for i in range(64)]
        results = await asyncio.gather(
            *(client.infer("slow_identity", {"x": row}, request_id=f"mine-{i}") for i, row in enumerate(rows))
        )
        for row, result in zip(rows, results, strict=True):
            np.testing.assert_array_equal(result["y"], row)
        after = (await client.model_statistics("slow_identity")).model_stats[0]
    assert unary == []
    runs = after.execution_count - before.execution_count
    assert after.inference_count - before.inference_count == 64
    assert runs < 64, "the calls on the stream were not batched together"


async def test_replies_that_overtake_each_other_reach_their_own_calls(server):
    async with AsyncInferenceClient(server.address, shared_stream=True) as client:
        slow = asyncio.ensure_future(client.infer("slow_identity", {"x": np.full((1, 2), 7, np.float32)}))
        await asyncio.sleep(0.005)  # written first, answered after the fast one (50 ms model)
        fast = await client.infer("flaky_rows", {"x": np.full((1, 4), 1, np.float32)})
        assert not slow.done()
        np.testing.assert_array_equal(fast["y"], np.full((1, 4), 2))
        np.testing.assert_array_equal((await slow)["y"], np.full((1, 2), 7))


async def test_a_failing_call_fails_alone_and_the_stream_goes_on(server):
    async with AsyncInferenceClient(server.address, shared_stream=True) as client:
        values = [1.0, 2.0, -1.0, 4.0]
        outcomes = await asyncio.gather(
            *(client.infer("flaky_rows", {"x": np.full((1, 4), v, np.float32)}) for v in values),
            return_exceptions=True,
        )
        assert isinstance(outcomes[2], TensorfleetError) and "negative value" in str(outcomes[2])
        assert [o["y"][0, 0] for i, o in enumerate(outcomes) if i != 2] == [2, 4, 8]
        with pytest.raises(TensorfleetError, match="'x'"):  # a bad request names its tensor
            await client.infer("flaky_rows", {"x": np.zeros((1, 3), np.float32)})
        later = await client.infer("flaky_rows", {"x": np.full((1, 4), 5, np.float32)})
        assert later["y"][0, 0] == 10


async def test_a_timeout_is_kept_by_the_client(server):
    async with AsyncInferenceClient(server.address, shared_stream=True) as client:
        with pytest.raises(DeadlineExceeded):
            await client.infer("slow_identity", {"x": np.zeros((1, 2), np.float32)}, timeout=0.005)
        late = await client.infer("slow_identity", {"x": np.ones((1, 2), np.float32)}, timeout=10)
        np.testing.assert_array_equal(late["y"], np.ones((1, 2)))


async def test_a_lost_server_fails_the_waiting_calls_and_the_next_call_opens_a_new_stream():
    first = launch_server(MODELS)
    port = first.port
    client = AsyncInferenceClient(first.address, shared_stream=True)
    try:
        await client.infer("slow_identity", {"x": np.zeros((1, 2), np.float32)})
        waiting = asyncio.ensure_future(client.infer("slow_identity", {"x": np.zeros((1, 2), np.float32)}))
        await asyncio.sleep(0.01)
        first.stop(signal.SIGKILL)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(waiting, 10)
        second = launch_server(MODELS, "--port", str(port))
        try:
            # the channel reconnects on grpc's backoff; until then a call may fail fast
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                try:
                    again = await client.infer("slow_identity", {"x": np.full((1, 2), 3, np.float32)})
                    break
                except Unavailable:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            np.testing.assert_array_equal(again["y"], np.full((1, 2), 3))
        finally:
            second.stop(signal.SIGKILL)  # the client still holds a stream: a drain would wait it out
    finally:
        await client.close()
        first.stop(signal.SIGKILL)


# --- the sync client: calls from many threads --------------------------------------------------
def test_threads_share_one_stream_and_each_gets_its_own_rows(server):
    from concurrent.futures import ThreadPoolExecutor

    with InferenceClient(server.address, shared_stream=True) as client:
        unary = no_unary_calls(client)
        before = client.model_statistics("slow_identity").model_stats[0]
        rows = [np.array([[i, 2 * i]], dtype=np.float32) for i in range(64)]
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(lambda row: client.infer("slow_identity", {"x": row}), rows))
        after = client.model_statistics("slow_identity").model_stats[0]
    assert unary == []
    for row, result in zip(rows, results, strict=True):
        np.testing.assert_array_equal(result["y"], row)
    assert after.inference_count - before.inference_count == 64
    assert after.execution_count - before.execution_count < 64


def test_sync_replies_overtake_failures_stay_alone_and_timeouts_are_kept(server):
    from concurrent.futures import ThreadPoolExecutor

    with InferenceClient(server.address, shared_stream=True) as client, ThreadPoolExecutor(2) as pool:
        slow = pool.submit(client.infer, "slow_identity", {"x": np.full((1, 2), 7, np.float32)})
        time.sleep(0.005)
        fast = client.infer("flaky_rows", {"x": np.full((1, 4), 1, np.float32)})
        assert not slow.done()
        np.testing.assert_array_equal(fast["y"], np.full((1, 4), 2))
        np.testing.assert_array_equal(slow.result(10)["y"], np.full((1, 2), 7))
        with pytest.raises(TensorfleetError, match="negative value"):
            client.infer("flaky_rows", {"x": np.full((1, 4), -1, np.float32)})
        with pytest.raises(DeadlineExceeded):
            client.infer("slow_identity", {"x": np.zeros((1, 2), np.float32)}, timeout=0.005)
        np.testing.assert_array_equal(client.infer("flaky_rows", {"x": np.ones((1, 4), np.float32)})["y"], 2)


def test_sync_lost_server_fails_the_waiting_call_and_a_new_stream_opens():
    from concurrent.futures import ThreadPoolExecutor

    first = launch_server(MODELS)
    port = first.port
    try:
        with InferenceClient(first.address, shared_stream=True) as client, ThreadPoolExecutor(1) as pool:
            client.infer("slow_identity", {"x": np.zeros((1, 2), np.float32)})
            waiting = pool.submit(client.infer, "slow_identity", {"x": np.zeros((1, 2), np.float32)})
            time.sleep(0.01)
            first.stop(signal.SIGKILL)
            with pytest.raises(Unavailable):
                waiting.result(10)
            second = launch_server(MODELS, "--port", str(port))
            try:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        again = client.infer("slow_identity", {"x": np.full((1, 2), 3, np.float32)})
                        break
                    except Unavailable:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
                np.testing.assert_array_equal(again["y"], np.full((1, 2), 3))
            finally:
                second.stop(signal.SIGKILL)  # the client still holds a stream: a drain would wait it out
    finally:
        first.stop(signal.SIGKILL)
