"""`tensorfleet run` passes large request tensors through system shared memory to a server on
this host, with outputs bitwise equal to the gRPC path; `policy.shared_memory: false` turns it off."""

from __future__ import annotations

import h5py
import numpy as np

from tests.serving import running_server

from .helpers import run_tensorfleet, write_job

CONFIG = """\
name: big
backend: python
max_batch_size: 8
inputs:
  - {name: x, datatype: FP32, shape: [16384]}
outputs:
  - {name: y, datatype: FP32, shape: [16384]}
batching: {max_queue_delay_ms: 1}
"""

MODEL = """\
class Model:
    def load(self, context):
        pass

    def predict(self, inputs):
        return {"y": inputs["x"] * 2.0 - 1.0}
"""


def test_run_through_shared_memory_matches_grpc(tmp_path):
    repository = tmp_path / "models"
    (repository / "big").mkdir(parents=True)
    (repository / "big" / "config.yaml").write_text(CONFIG)
    (repository / "big" / "model.py").write_text(MODEL)
    x = np.random.default_rng(5).standard_normal((40, 16384)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with running_server(repository) as server:
        outputs = {}
        for shared in (True, False):
            job = write_job(
                tmp_path / f"job-{shared}.yaml", input={"path": "x.npy"},
                model={"name": "big", "servers": [server.address]},
                output={"path": f"out-{shared}.h5"}, chunking={"chunk_rows": 16, "batch_rows": 8},
                policy={"shared_memory": shared},
            )
            result = run_tensorfleet("run", job)
            assert result.returncode == 0, result.stderr
            registered = server.log().count("shared memory region")
            outputs[shared] = (registered, h5py.File(tmp_path / f"out-{shared}.h5")["y"][:])
    assert outputs[True][0] >= 1  # the shared-memory run registered a slot
    assert outputs[False][0] == outputs[True][0]  # the other did not
    want = x * 2.0 - 1.0
    assert outputs[True][1].tobytes() == want.tobytes()
    assert outputs[False][1].tobytes() == want.tobytes()
