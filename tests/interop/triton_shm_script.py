"""Drive tensorfleet's system shared memory with Triton's own client and shm utilities.

Runs as its own process (tritonclient and tensorfleet both register protobuf package
`inference`). The `simple` model's inputs go in one region and its outputs come back in
another, exactly as Triton's simple_grpc_shm_client example does it; then the mistakes a
client can make. Writes results.json and tensors.npz to --out.

    python tests/interop/triton_shm_script.py --url 127.0.0.1:PORT --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException


def _error(call) -> dict:
    try:
        call()
    except InferenceServerException as error:
        return {"status": str(error.status()), "message": error.message()}
    return {"status": "OK", "message": ""}


def _infer(client, region_in: str, region_out: str, in_offset: int = 0, in_size: int = 64) -> grpcclient.InferResult:
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_shared_memory(region_in, in_size, offset=in_offset)
    inputs[1].set_shared_memory(region_in, 64, offset=64)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory(region_out, 64)
    outputs[1].set_shared_memory(region_out, 64, offset=64)
    return client.infer("simple", inputs, outputs=outputs)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tag = os.getpid()
    client = grpcclient.InferenceServerClient(args.url)
    client.unregister_system_shared_memory()
    results: dict = {"extensions": list(client.get_server_metadata().extensions)}

    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.full((1, 16), 3.0, dtype=np.float32)
    in_handle = shm.create_shared_memory_region("input_data", f"/tf_test_in_{tag}", 128)
    out_handle = shm.create_shared_memory_region("output_data", f"/tf_test_out_{tag}", 128)
    try:
        shm.set_shared_memory_region(in_handle, [a, b])
        client.register_system_shared_memory("input_data", f"/tf_test_in_{tag}", 128)
        client.register_system_shared_memory("output_data", f"/tf_test_out_{tag}", 128)
        status = client.get_system_shared_memory_status(as_json=True)
        results["status"] = {name: {k: str(v) for k, v in region.items()} for name, region in status["regions"].items()}

        result = _infer(client, "input_data", "output_data")
        out0 = result.get_output("OUTPUT0")
        out1 = result.get_output("OUTPUT1")
        sum_ = shm.get_contents_as_numpy(out_handle, np.float32, list(out0.shape))
        diff = shm.get_contents_as_numpy(out_handle, np.float32, list(out1.shape), offset=64)
        np.savez(args.out / "tensors.npz", a=a, b=b, sum=sum_, diff=diff)

        results["unknown_region"] = _error(lambda: _infer(client, "no_such_region", "output_data"))
        results["past_the_end"] = _error(lambda: _infer(client, "input_data", "output_data", in_offset=96))
        results["wrong_size"] = _error(lambda: _infer(client, "input_data", "output_data", in_size=60))
        results["key_with_separator"] = _error(
            lambda: client.register_system_shared_memory("evil", "/../etc/passwd", 16))
        results["missing_key"] = _error(
            lambda: client.register_system_shared_memory("ghost", f"/tf_test_none_{tag}", 16))
        results["too_big_for_object"] = _error(
            lambda: client.register_system_shared_memory("big", f"/tf_test_in_{tag}", 4096))
        results["twice"] = _error(
            lambda: client.register_system_shared_memory("input_data", f"/tf_test_in_{tag}", 128))

        client.unregister_system_shared_memory("input_data")
        results["after_unregister"] = sorted(client.get_system_shared_memory_status(as_json=True).get("regions", {}))
        client.unregister_system_shared_memory()
        results["after_unregister_all"] = sorted(
            client.get_system_shared_memory_status(as_json=True).get("regions", {}))
    finally:
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
