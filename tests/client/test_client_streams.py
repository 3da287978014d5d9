"""The ordered window both clients share (client/base.py), alone and over a real server."""

import ast
from pathlib import Path

import numpy as np
import pytest

from tensorfleet.client import (
    AsyncInferenceClient,
    InferenceClient,
    InvalidArgument,
    TensorfleetError,
    Unavailable,
)
from tensorfleet.client.base import InOrder
from tensorfleet.client.errors import InternalError
from tests.inprocess import inprocess_server

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_results_come_out_in_request_order_whatever_order_they_arrive_in():
    order = InOrder(return_exceptions=False)
    assert list(order.push(2, {"y": np.array(2)})) == []
    assert list(order.push(1, {"y": np.array(1)})) == []
    assert [r["y"] for r in order.push(0, {"y": np.array(0)})] == [0, 1, 2]
    order.finish()


def test_a_failure_is_raised_on_its_turn_after_the_results_before_it():
    order = InOrder(return_exceptions=False)
    assert list(order.push(1, InvalidArgument("row 1 is bad"))) == []
    handed = []
    with pytest.raises(InvalidArgument, match="row 1 is bad"):
        for item in order.push(0, {"y": np.array(0)}):
            handed.append(item)
    assert len(handed) == 1


def test_with_return_exceptions_a_failure_takes_its_place():
    order = InOrder(return_exceptions=True)
    error = InvalidArgument("bad")
    assert list(order.push(1, error)) == []
    items = list(order.push(0, {"y": np.array(0)}))
    assert items[1] is error


def test_a_stream_that_ends_with_a_gap_is_an_error():
    order = InOrder(return_exceptions=False)
    list(order.push(1, {"y": np.array(1)}))
    with pytest.raises(InternalError, match="1 responses out of order"):
        order.finish()


@pytest.fixture(scope="module")
def server():
    with inprocess_server(MODELS) as process:
        yield process


VALUES = [1, 2, -1, 4, 5, 6]


def test_sync_stream_in_order_with_a_small_window(server):
    with InferenceClient(server.address) as client:
        requests = [{"x": np.full((1, 4), v, np.float32)} for v in VALUES]
        results = list(client.stream("flaky_rows", requests, window=2, return_exceptions=True))
        assert isinstance(results[2], TensorfleetError) and "negative value" in str(results[2])
        assert [r["y"][0, 0] for i, r in enumerate(results) if i != 2] == [2, 4, 8, 10, 12]
        with pytest.raises(ValueError, match="window must be at least 1"):
            list(client.stream("flaky_rows", requests, window=0))


async def test_async_stream_in_order_raises_the_first_failure_on_its_turn(server):
    async with AsyncInferenceClient(server.address) as client:
        await client.wait_until_ready(timeout=30, model="flaky_rows")

        async def requests():
            for v in VALUES:
                yield {"x": np.full((1, 4), v, np.float32)}

        seen = []
        with pytest.raises(TensorfleetError, match="negative value"):
            async for result in client.stream("flaky_rows", requests(), window=3):
                seen.append(result["y"][0, 0])
        assert seen == [2, 4]
        results = [r async for r in client.stream("flaky_rows", requests(), return_exceptions=True)]
        assert [r["y"][0, 0] for i, r in enumerate(results) if i != 2] == [2, 4, 8, 10, 12]


def test_wait_until_ready_names_the_address_when_nobody_answers():
    with InferenceClient("127.0.0.1:1") as client:
        with pytest.raises(Unavailable, match="127.0.0.1:1 not ready after 0.3s"):
            client.wait_until_ready(timeout=0.3)


async def test_async_wait_until_ready_names_the_address_when_nobody_answers():
    async with AsyncInferenceClient("127.0.0.1:1") as client:
        with pytest.raises(Unavailable, match="127.0.0.1:1 not ready after 0.3s"):
            await client.wait_until_ready(timeout=0.3)


def _client_imports() -> dict[str, set[str]]:
    """module -> client modules it imports anywhere in its text (function-level imports too)."""
    folder = Path(__file__).resolve().parents[2] / "client"
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = node.module or ""
                if node.level == 1 and name:
                    targets.add(name.split(".")[0])
                elif node.level == 1:
                    targets.update(alias.name for alias in node.names)
                elif name.startswith("tensorfleet.client."):
                    targets.add(name.split(".")[2])
        graph[path.stem] = targets - {path.stem}
    return graph


def test_the_client_modules_import_each_other_without_a_cycle():
    graph = _client_imports()
    graph.pop("__init__")  # the package re-exports; nothing below imports it
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done or module not in graph:
            return
        for target in graph[module]:
            visit(target, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())
