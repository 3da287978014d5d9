"""The dynamic batcher driven directly: merging, ordering, token budgets, limits, failures."""

import asyncio
import threading
import time

import numpy as np
import pytest

from tensorfleet.core.errors import InternalError, ResourceExhausted, Unavailable
from tensorfleet.services.backends.base import OutOfMemory
from tensorfleet.services.batching.assembly import BatchAssembly
from tensorfleet.services.batching.batcher import DynamicBatcher
from tensorfleet.services.model_config import ModelConfig
from tensorfleet.services.validation import DecodedRequest


def make_config(**batching) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "m",
            "backend": "python",
            "max_batch_size": batching.pop("max_batch_size", 16),
            "inputs": [{"name": "x", "datatype": "INT64", "shape": [-1], "ragged": True, "pad_value": -1}],
            "outputs": [
                {"name": "y", "datatype": "INT64", "shape": [-1], "ragged": True},
                {"name": "width", "datatype": "INT64", "shape": []},
            ],
            "batching": {"max_queue_delay_ms": 20, **batching},
        }
    )


class RecordingModel:
    """y = x * 10; remembers the shape of every batch it ran."""

    def __init__(self, fail_on: int | None = None, oom_above: int | None = None) -> None:
        self.batches: list[tuple[int, int]] = []
        self.fail_on, self.oom_above = fail_on, oom_above

    def __call__(self, inputs):
        x = inputs["x"]
        if self.oom_above and x.shape[0] > self.oom_above:
            raise OutOfMemory("too many rows")
        if self.fail_on is not None and (x == self.fail_on).any():
            raise ValueError(f"bad value {self.fail_on}")
        self.batches.append(x.shape)
        return {"y": x * 10, "width": np.full(x.shape[0], x.shape[1], dtype=np.int64)}


def request(values, exclusive=False) -> DecodedRequest:
    x = np.array(values, dtype=np.int64).reshape(1, -1)
    return DecodedRequest(inputs={"x": x}, rows=1, length=x.shape[1], exclusive=exclusive)


async def run_all(batcher, requests):
    return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)


async def test_concurrent_requests_are_merged_and_each_gets_its_own_rows():
    model = RecordingModel()
    batcher = DynamicBatcher(make_config(), model)
    requests = [request([i] * (1 + i % 3)) for i in range(12)]
    results = await run_all(batcher, requests)
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], np.array([[i * 10] * (1 + i % 3)]))
    assert len(model.batches) < len(requests)  # merged
    await batcher.close()


async def test_ragged_inputs_are_padded_to_the_longest_and_cut_back():
    model = RecordingModel()
    batcher = DynamicBatcher(make_config(), model)
    results = await run_all(batcher, [request([1]), request([2, 2, 2])])
    assert model.batches == [(2, 3)]
    np.testing.assert_array_equal(results[0]["y"], [[10]])  # padding removed
    assert results[0]["width"].tolist() == [3]  # the model saw the padded width
    await batcher.close()


async def test_exclusive_requests_run_alone():
    model = RecordingModel()
    batcher = DynamicBatcher(make_config(), model)
    await run_all(batcher, [request([1], exclusive=True), request([2], exclusive=True), request([3])])
    assert sorted(model.batches) == [(1, 1)] * 3
    await batcher.close()


async def test_token_budget_bounds_rows_times_padded_length_and_groups_lengths():
    model = RecordingModel()
    config = make_config(token_budget=64, length_bucket=8, max_queue_delay_ms=50)
    batcher = DynamicBatcher(config, model)
    short = [request([1] * 4) for _ in range(6)]
    long = [request([2] * 30) for _ in range(4)]
    interleaved = [item for pair in zip(short, long, strict=False) for item in pair] + short[4:]
    await run_all(batcher, interleaved)
    for rows, width in model.batches:
        padded = -(-width // 8) * 8
        assert rows * padded <= 64 or rows == 1
    # grouped by length: no batch mixes a 4-token and a 30-token request
    assert all(width in (4, 30) for _, width in model.batches)
    await batcher.close()


async def test_full_queue_answers_resource_exhausted():
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def blocking(inputs):
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        return {"y": inputs["x"], "width": np.zeros(inputs["x"].shape[0], np.int64)}

    batcher = DynamicBatcher(make_config(max_queue_size=3, max_batch_size=1), blocking)
    first = asyncio.ensure_future(batcher.submit(request([0])))
    await asyncio.sleep(0.1)  # the first is now running; the queue is empty
    waiting = []
    for i in range(5):  # one full batch may move on to wait on the model thread
        waiting.append(asyncio.ensure_future(batcher.submit(request([i]))))
        await asyncio.sleep(0.05)
        if batcher.queue_depth == 3:
            break
    assert batcher.queue_depth == 3
    with pytest.raises(ResourceExhausted, match="queue is full"):
        await batcher.submit(request([9]))
    release.set()
    await asyncio.gather(first, *waiting)
    await batcher.close()


async def test_out_of_memory_halves_the_batch_until_it_fits():
    model = RecordingModel(oom_above=2)
    batcher = DynamicBatcher(make_config(), model)
    results = await run_all(batcher, [request([i]) for i in range(7)])
    assert [r["y"][0, 0] for r in results] == [i * 10 for i in range(7)]
    assert max(rows for rows, _ in model.batches) <= 2
    await batcher.close()


async def test_a_failing_request_fails_alone():
    model = RecordingModel(fail_on=3)
    batcher = DynamicBatcher(make_config(), model)
    results = await run_all(batcher, [request([i]) for i in range(6)])
    assert isinstance(results[3], InternalError) and "bad value 3" in results[3].message
    assert [r["y"][0, 0] for i, r in enumerate(results) if i != 3] == [0, 10, 20, 40, 50]
    await batcher.close()


async def test_wrong_output_row_count_is_never_misrouted():
    """A model that drops rows: the merged batch is refused and each request rerun alone."""
    seen = []

    def first_row_only(inputs):
        seen.append(inputs["x"].shape[0])
        return {"y": inputs["x"][:1] * 10, "width": np.zeros(1, np.int64)}

    batcher = DynamicBatcher(make_config(max_queue_delay_ms=50), first_row_only)
    results = await run_all(batcher, [request([1]), request([2])])
    assert seen == [2, 1, 1]
    assert [r["y"][0, 0] for r in results] == [10, 20]
    await batcher.close()


def test_assembly_checks_row_counts():
    config = make_config()
    assembly = BatchAssembly(config, [request([1]), request([2])])
    with pytest.raises(InternalError, match="output 'y' has 1 rows for a batch of 2"):
        assembly.split({"y": np.zeros((1, 1), np.int64), "width": np.zeros(2, np.int64)})


class GatedModel(RecordingModel):
    """Holds its first batch until `gate` is set; notes when each batch started."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.started: list[float] = []

    def __call__(self, inputs):
        self.started.append(time.monotonic())
        if len(self.started) == 1:
            assert self.gate.wait(10)
        return super().__call__(inputs)


def submit_all(batcher, values) -> list[asyncio.Future]:
    return [asyncio.ensure_future(batcher.submit(request([v]))) for v in values]


async def test_a_full_batch_waits_on_the_model_thread_and_starts_without_the_event_loop():
    model = GatedModel()
    batcher = DynamicBatcher(make_config(max_batch_size=2), model)
    first = submit_all(batcher, [1, 2])
    await asyncio.sleep(0.1)  # running, held by the gate
    second = submit_all(batcher, [3, 4])
    await asyncio.sleep(0.1)  # full: formed and handed to the model thread
    model.gate.set()
    time.sleep(0.5)  # the event loop is blocked: only the model thread can start the next batch
    blocked_until = time.monotonic()
    assert len(model.started) == 2 and model.started[1] < blocked_until
    results = await asyncio.gather(*first, *second)
    assert [r["y"][0, 0] for r in results] == [10, 20, 30, 40]
    await batcher.close()


async def test_a_batch_that_is_not_full_waits_for_the_device_and_gathers_company():
    model = GatedModel()
    batcher = DynamicBatcher(make_config(max_batch_size=2, max_queue_delay_ms=1), model)
    first = submit_all(batcher, [1, 2])
    await asyncio.sleep(0.1)
    lonely = submit_all(batcher, [3])
    await asyncio.sleep(0.1)  # far past the queue delay, but the device is busy
    company = submit_all(batcher, [4])
    await asyncio.sleep(0.05)
    model.gate.set()
    await asyncio.gather(*first, *lonely, *company)
    assert model.batches == [(2, 1), (2, 1)]  # 3 and 4 ran together
    await batcher.close()


async def test_closing_answers_a_batch_still_waiting_behind_the_running_one():
    model = GatedModel()
    batcher = DynamicBatcher(make_config(max_batch_size=2), model)
    running = submit_all(batcher, [1, 2])
    await asyncio.sleep(0.1)
    waiting = submit_all(batcher, [3, 4])
    await asyncio.sleep(0.1)
    await batcher.close()
    model.gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*running, *waiting, return_exceptions=True), 5)
    assert [o["y"][0, 0] for o in outcomes[:2]] == [10, 20]  # the running batch still answers
    assert all(isinstance(o, Unavailable) for o in outcomes[2:])


async def test_predict_is_told_the_outputs_a_batch_wants_and_may_leave_out_the_rest():
    told = []

    def lazy(inputs, outputs=None):
        told.append(outputs)
        result = {"width": np.zeros(inputs["x"].shape[0], np.int64)}
        if outputs is None or "y" in outputs:
            result["y"] = inputs["x"] * 10
        return result

    def wanting(values, outputs):
        item = request(values)
        item.requested_outputs = outputs
        return item

    batcher = DynamicBatcher(make_config(max_batch_size=2), lazy)
    only_width = await run_all(batcher, [wanting([1], ["width"]), wanting([2], ["width"])])
    assert told == [frozenset({"width"})]
    assert all(set(result) == {"width"} for result in only_width)
    mixed = await run_all(batcher, [wanting([3], ["width"]), request([4])])  # one wants all
    assert told[-1] is None
    assert set(mixed[0]) == {"width"} and mixed[1]["y"][0, 0] == 40
    await batcher.close()


async def test_requests_that_fill_the_token_budget_are_a_full_batch_to_queue_behind_the_running_one():
    model = GatedModel()
    config = make_config(max_batch_size=16, token_budget=32, length_bucket=8)
    batcher = DynamicBatcher(config, model)
    first = asyncio.ensure_future(batcher.submit(request([1] * 16)))
    await asyncio.sleep(0.1)  # running, held by the gate
    budget = [asyncio.ensure_future(batcher.submit(request([2] * 16))) for _ in range(2)]  # 2 x 16 tokens
    await asyncio.sleep(0.1)  # 2 rows of 16 fill the 32-token budget though 2 < 16 rows
    model.gate.set()
    time.sleep(0.5)  # the event loop is blocked: only a batch already queued can start
    assert len(model.started) == 2
    results = await asyncio.gather(first, *budget)
    assert [r["y"][0, 0] for r in results] == [10, 20, 20]
    assert model.batches == [(1, 16), (2, 16)]
    await batcher.close()


async def test_requests_with_different_parameters_never_share_a_batch_and_each_batch_gets_its_own():
    seen: list[tuple[list[int], dict]] = []

    def predict(inputs, parameters=None):
        seen.append((inputs["x"][:, 0].tolist(), dict(parameters or {})))
        scale = (parameters or {}).get("scale", 1)
        return {"y": inputs["x"] * scale, "width": np.full(inputs["x"].shape[0], 1, dtype=np.int64)}

    batcher = DynamicBatcher(make_config(max_queue_delay_ms=200), predict)
    requests = [request([i]) for i in range(6)]
    for i, item in enumerate(requests):
        item.parameters = {"scale": 10} if i % 2 else {}
    results = await run_all(batcher, requests)
    await batcher.close()
    assert [int(r["y"][0, 0]) for r in results] == [0, 10, 2, 30, 4, 50]
    assert all(params == ({"scale": 10} if rows[0] % 2 else {}) for rows, params in seen)
    assert all(len({row % 2 for row in rows}) == 1 for rows, _ in seen)  # never mixed
    assert max(len(rows) for rows, _ in seen) > 1  # equal parameters still merge


# --- a batch is full when nothing more can join it (issue 25) ------------------------------
def block(rows: int, length: int, value: int = 1) -> DecodedRequest:
    """One request of `rows` rows of `length` tokens."""
    x = np.full((rows, length), value, dtype=np.int64)
    return DecodedRequest(inputs={"x": x}, rows=rows, length=length)


async def let_the_loop_run(turns: int = 20) -> None:
    """Give the batcher's loop task its turns without waiting for any clock."""
    for _ in range(turns):
        await asyncio.sleep(0)


# an hour: a batch that waits for company here is one the batcher did not think full
HOUR_MS = 3_600_000


async def test_a_request_that_leaves_no_room_for_another_row_goes_to_an_idle_device_at_once():
    model = RecordingModel()
    config = make_config(max_batch_size=64, token_budget=4096, length_bucket=1, max_queue_delay_ms=HOUR_MS)
    batcher = DynamicBatcher(config, model)
    full = asyncio.ensure_future(batcher.submit(block(60, 68)))  # 4,080 tokens: a 61st row makes 4,148
    await let_the_loop_run()
    assert batcher.queue_depth == 0  # handed to the model thread, not waiting an hour for company
    result = await full
    assert result["y"].shape == (60, 68) and model.batches == [(60, 68)]
    await batcher.close()


async def test_a_request_with_room_for_more_rows_waits_for_company():
    model = RecordingModel()
    config = make_config(max_batch_size=64, token_budget=4096, length_bucket=1, max_queue_delay_ms=HOUR_MS)
    batcher = DynamicBatcher(config, model)
    roomy = asyncio.ensure_future(batcher.submit(block(50, 68)))  # 3,400 tokens; 60 rows would fit
    await let_the_loop_run()
    assert batcher.queue_depth == 1 and model.batches == []
    company = asyncio.ensure_future(batcher.submit(block(10, 60, value=2)))  # 60 x 68 = 4,080: now full
    await asyncio.gather(roomy, company)
    assert model.batches == [(60, 68)]  # one batch, padded to the longest
    await batcher.close()


async def test_a_waiting_request_that_does_not_fit_makes_the_batch_full():
    model = RecordingModel()
    config = make_config(max_batch_size=64, token_budget=4096, length_bucket=1, max_queue_delay_ms=HOUR_MS)
    batcher = DynamicBatcher(config, model)
    first = asyncio.ensure_future(batcher.submit(block(40, 60)))  # 2,400 tokens, room for 27 more rows
    second = asyncio.ensure_future(batcher.submit(block(30, 60, value=2)))  # 70 x 60 would be 4,200
    await let_the_loop_run()
    assert batcher.queue_depth == 1  # the first went at once; the second waits for its own company
    await first
    assert model.batches == [(40, 60)]
    await batcher.close()
    with pytest.raises(Unavailable):
        await second


async def test_a_request_that_fills_the_budget_queues_behind_the_running_batch_at_once():
    model = GatedModel()
    config = make_config(max_batch_size=64, token_budget=4096, length_bucket=1, max_queue_delay_ms=HOUR_MS)
    batcher = DynamicBatcher(config, model)
    running = asyncio.ensure_future(batcher.submit(block(60, 68)))
    await let_the_loop_run()
    assert batcher.queue_depth == 0  # running, held by the gate
    behind = asyncio.ensure_future(batcher.submit(block(60, 68, value=2)))
    roomy = asyncio.ensure_future(batcher.submit(block(50, 68, value=3)))  # 60 + 50 rows: left out
    await let_the_loop_run()
    assert batcher.queue_depth == 1  # `behind` is on the model thread; `roomy` still gathers company
    model.gate.set()
    await asyncio.gather(running, behind)
    assert model.batches == [(60, 68), (60, 68)]
    await batcher.close()
    with pytest.raises(Unavailable):
        await roomy
