"""A model is loaded, warmed and run on one thread, its own (services/model_runtime.py).

Torch's OpenMP team belongs to the thread that warmed the model; running it elsewhere cost
a small model a quarter of its speed. This checks the thread, not the speed."""

from __future__ import annotations

import threading

import numpy as np

from tensorfleet.services.metrics import ServerMetrics
from tensorfleet.services.model_runtime import ModelRuntime
from tensorfleet.services.repository.repository import ModelRepository, ModelState
from tensorfleet.services.validation import DecodedRequest

CONFIG = """\
name: threads
backend: python
max_batch_size: 4
inputs:
  - {name: x, datatype: FP32, shape: [1]}
outputs:
  - {name: loaded_on, datatype: INT64, shape: [1]}
  - {name: run_on, datatype: INT64, shape: [1]}
batching: {max_queue_delay_ms: 1}
warmup:
  - {x: [0.0]}
"""

MODEL = """\
import threading
import numpy as np


class Model:
    def load(self, context):
        self.loaded_on = threading.get_native_id()
        self.warmed_on = set()

    def predict(self, inputs):
        self.warmed_on.add(threading.get_native_id())
        rows = inputs["x"].shape[0]
        warm = next(iter(self.warmed_on)) if len(self.warmed_on) == 1 else -1
        return {
            "loaded_on": np.full((rows, 1), self.loaded_on if warm == self.loaded_on else -1, np.int64),
            "run_on": np.full((rows, 1), threading.get_native_id(), np.int64),
        }
"""


def _repository(tmp_path) -> ModelRepository:
    folder = tmp_path / "threads"
    folder.mkdir()
    (folder / "config.yaml").write_text(CONFIG)
    (folder / "model.py").write_text(MODEL)
    return ModelRepository(tmp_path)


async def _run_once(runtime: ModelRuntime) -> dict[str, np.ndarray]:
    request = DecodedRequest(inputs={"x": np.zeros((1, 1), np.float32)}, rows=1)
    return await runtime.served("threads").batcher.submit(request)


async def test_the_model_runs_on_the_thread_that_loaded_and_warmed_it(tmp_path):
    runtime = ModelRuntime(_repository(tmp_path), ServerMetrics())
    await runtime.load_all()
    assert runtime.repository.entry("threads").state is ModelState.READY
    outputs = await _run_once(runtime)
    loaded_on, run_on = int(outputs["loaded_on"][0, 0]), int(outputs["run_on"][0, 0])
    assert loaded_on != -1, "warm-up and predict ran on different threads"
    assert run_on == loaded_on
    assert run_on != threading.get_native_id()  # not the event loop's thread


async def test_a_reload_keeps_the_model_on_its_thread(tmp_path):
    runtime = ModelRuntime(_repository(tmp_path), ServerMetrics())
    await runtime.load("threads")
    first = await _run_once(runtime)
    await runtime.load("threads")  # closes the old batcher; the thread stays the model's
    second = await _run_once(runtime)
    assert int(second["run_on"][0, 0]) == int(second["loaded_on"][0, 0]) == int(first["run_on"][0, 0])
