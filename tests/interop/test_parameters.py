"""Request parameters from a client nobody here wrote (tritonclient.grpc) reach a python model's
predict (issue 13): `infer(..., parameters={...})`, concurrent requests with different ones."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.serving import REPO_ROOT, running_server

pytestmark = pytest.mark.interop

# Never imported here: its generated protos clash with ours in one process (the script runs it).
if importlib.util.find_spec("tritonclient") is None:
    pytest.skip("tritonclient is not installed", allow_module_level=True)

SCRIPT = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient(sys.argv[1])
x = np.arange(16, dtype=np.float32).reshape(2, 8)

def call(scale):
    tensor = grpcclient.InferInput("x", [2, 8], "FP32")
    tensor.set_data_from_numpy(x)
    params = {} if scale is None else {"scale": scale, "steps": 4}
    result = client.infer("scaled", [tensor], parameters=params)
    return scale, result.as_numpy("y").tolist(), result.as_numpy("steps").tolist()

with ThreadPoolExecutor(8) as pool:
    print(json.dumps(list(pool.map(call, [None, 2, 3, None, 2, 3, 5, 5]))))
"""


def test_tritonclient_parameters_reach_the_model_and_requests_with_different_ones_do_not_mix():
    with running_server(REPO_ROOT / "tests" / "coordinator" / "models") as server:
        done = subprocess.run([sys.executable, "-c", SCRIPT, server.address], capture_output=True, text=True,
                              timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    x = [[float(v) for v in range(row * 8, row * 8 + 8)] for row in range(2)]
    for scale, y, steps in json.loads(done.stdout):
        factor = 1 if scale is None else scale
        assert y == [[v * factor for v in row] for row in x], scale
        assert steps == ([0.0, 0.0] if scale is None else [4.0, 4.0])
