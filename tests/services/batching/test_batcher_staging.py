"""The batcher's feeder thread: a batch queued behind the running one is merged and copied to the
device (`Backend.stage`) while the model thread still computes, and every failure there falls
back to the plain path. Driven with a stand-in device, since copies need a GPU to overlap."""

import asyncio
import threading

import numpy as np

from tensorfleet.services.backends.base import OutOfMemory
from tensorfleet.services.batching.batcher import DynamicBatcher
from tests.services.batching.test_batcher import make_config, request


class StagingDevice:
    """stage(): a copy of the inputs; predict_staged(): y = x * 10 once the gate opens.
    Calling it (plain predict) is the unstaged path the batcher falls back to."""

    def __init__(self, oom_above: int | None = None, stage_fails: bool = False) -> None:
        self.gate = threading.Event()
        self.staged: list[list[int]] = []
        self.plain_calls: list[int] = []
        self.oom_above, self.stage_fails = oom_above, stage_fails

    def stage(self, inputs):
        if self.stage_fails:
            raise RuntimeError("the copy failed")
        self.staged.append(inputs["x"][:, 0].tolist())
        return {"x": inputs["x"].copy()}

    def predict_staged(self, staged, outputs=None):
        x = staged["x"]
        if self.oom_above and x.shape[0] > self.oom_above:
            raise OutOfMemory("too many rows")
        if not self.gate.wait(10):
            raise RuntimeError("gate never opened")
        return {"y": x * 10, "width": np.full(x.shape[0], x.shape[1], dtype=np.int64)}

    def __call__(self, inputs, outputs=None):
        x = inputs["x"]
        if self.oom_above and x.shape[0] > self.oom_above:
            raise OutOfMemory("too many rows")
        self.plain_calls.append(x.shape[0])
        return {"y": x * 10, "width": np.full(x.shape[0], x.shape[1], dtype=np.int64)}

    @staticmethod
    def stages():
        return {"h2d": 5, "compute": 7, "d2h": 3}


def submit(batcher, values):
    return [asyncio.ensure_future(batcher.submit(request([v]))) for v in values]


async def test_the_next_batch_is_copied_while_the_current_one_computes():
    device = StagingDevice()
    batcher = DynamicBatcher(make_config(max_batch_size=2), device, staging=device, device_stages=device.stages)
    first = submit(batcher, [1, 2])
    await asyncio.sleep(0.1)  # computing, held by the gate
    second = submit(batcher, [3, 4])
    await asyncio.sleep(0.2)  # full: handed over, and the feeder copies it at once
    assert device.staged == [[1, 2], [3, 4]], "the queued batch was not staged during the running one"
    device.gate.set()
    results = await asyncio.gather(*first, *second)
    assert [int(r["y"][0, 0]) for r in results] == [10, 20, 30, 40]
    assert device.plain_calls == []
    stats = batcher.stats
    assert stats.stages["h2d"].ns == 10 and stats.stages["d2h"].count == 2 and stats.stages["merge"].count == 2
    # the copy ran on the feeder, yet compute_infer still leaves the copies out of the model's time
    assert stats.compute_input.ns == stats.stages["merge"].ns + 10
    await batcher.close()


async def test_out_of_memory_on_a_staged_batch_halves_it_on_the_host():
    device = StagingDevice(oom_above=1)
    device.gate.set()
    batcher = DynamicBatcher(make_config(max_batch_size=2), device, staging=device)
    results = await asyncio.gather(*submit(batcher, [5, 6]))
    assert [int(r["y"][0, 0]) for r in results] == [50, 60]
    assert device.plain_calls == [1, 1]
    await batcher.close()


async def test_a_failed_copy_runs_the_batch_unstaged():
    device = StagingDevice(stage_fails=True)
    batcher = DynamicBatcher(make_config(max_batch_size=2), device, staging=device)
    results = await asyncio.gather(*submit(batcher, [7, 8]))
    assert [int(r["y"][0, 0]) for r in results] == [70, 80]
    assert device.plain_calls == [2]
    await batcher.close()


STAGING_MODEL = '''
import threading

import numpy as np


class Model:
    """Stages on any device: stage() notes its thread; predict_staged() says it ran staged."""

    def load(self, context):
        pass

    def can_stage(self):
        return True

    def stage(self, inputs):
        return inputs["x"].copy(), threading.current_thread().name

    def predict_staged(self, staged):
        x, thread = staged
        fed = np.full((x.shape[0], 1), thread.startswith("feed-"), dtype=np.int64)
        return {"y": x * 2, "fed": fed}

    def predict(self, inputs):
        x = inputs["x"]
        return {"y": x * 2, "fed": np.zeros((x.shape[0], 1), dtype=np.int64)}
'''


def test_a_python_model_that_stages_is_fed_by_the_feeder_thread_in_a_real_server(tmp_path):
    from tensorfleet.client import InferenceClient
    from tests.serving import running_server

    folder = tmp_path / "staged"
    folder.mkdir()
    (folder / "model.py").write_text(STAGING_MODEL)
    (folder / "config.yaml").write_text(
        "name: staged\nbackend: python\nmax_batch_size: 4\n"
        "inputs: [{name: x, datatype: FP32, shape: [2]}]\n"
        "outputs: [{name: y, datatype: FP32, shape: [2]}, {name: fed, datatype: INT64, shape: [1]}]\n"
    )
    rows = [np.full((1, 2), i, np.float32) for i in range(12)]
    with running_server(tmp_path) as server, InferenceClient(server.address) as client:
        results = list(client.stream("staged", [{"x": r} for r in rows], window=8))
    for row, result in zip(rows, results, strict=True):
        np.testing.assert_array_equal(result["y"], row * 2)
        assert result["fed"][0, 0] == 1, "the batch was not staged by the feeder thread"
