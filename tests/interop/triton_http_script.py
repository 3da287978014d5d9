"""Drive a running tensorfleet REST endpoint with Triton's own HTTP client, `tritonclient.http`.

Runs as its own process, like triton_script.py (tritonclient's packages stay out of the test
process). Writes `results.json` (control-plane replies, errors) and `tensors.npz` (every input
sent and output received, per mode) to --out; the test sends the same inputs over gRPC and
compares bitwise.

    python tests/interop/triton_http_script.py --url 127.0.0.1:PORT --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

SIMPLE_MODELS = {"simple": "FP32", "simple_int64": "INT64", "simple_fp16": "FP16"}
#: JSON mode sends text only (JSON strings are UTF-8); binary mode sends any bytes.
TEXT = {
    "json": [b"hello", b"", "\u00e9t\u00e9 ok".encode(), b"x" * 300],
    "binary": [b"hello", b"", "\u00e9t\u00e9 ok".encode(), b"\x00\xffbin", b"x" * 1000],
}


def _inputs(datatype: str, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if datatype == "INT64":
        return tuple(rng.integers(-(2**40), 2**40, size=(rows, 16), dtype=np.int64) for _ in range(2))
    dtype = np.float16 if datatype == "FP16" else np.float32
    return tuple(rng.uniform(-100, 100, size=(rows, 16)).astype(dtype) for _ in range(2))


def run(client: httpclient.InferenceServerClient, results: dict, tensors: dict) -> None:
    rng = np.random.default_rng(20261201)
    results["server_live"] = client.is_server_live()
    results["server_ready"] = client.is_server_ready()
    results["model_ready"] = {name: client.is_model_ready(name) for name in [*SIMPLE_MODELS, "echo_bytes"]}
    results["server_metadata"] = client.get_server_metadata()
    results["model_metadata"] = {name: client.get_model_metadata(name) for name in SIMPLE_MODELS}
    results["model_config"] = client.get_model_config("simple")
    results["repository_index"] = client.get_model_repository_index()
    ids = {}
    for mode, binary in (("json", False), ("binary", True)):
        for model, datatype in SIMPLE_MODELS.items():
            a, b = _inputs(datatype, 3, rng)
            inputs = [httpclient.InferInput(n, list(a.shape), datatype) for n in ("INPUT0", "INPUT1")]
            inputs[0].set_data_from_numpy(a, binary_data=binary)
            inputs[1].set_data_from_numpy(b, binary_data=binary)
            outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")]
            result = client.infer(model, inputs, outputs=outputs, request_id=f"{mode}-{model}")
            ids[f"{mode}/{model}"] = result.get_response()["id"]
            tensors[f"{mode}/{model}/INPUT0"], tensors[f"{mode}/{model}/INPUT1"] = a, b
            for name in ("OUTPUT0", "OUTPUT1"):
                tensors[f"{mode}/{model}/{name}"] = result.as_numpy(name)
        text = np.array(TEXT[mode], dtype=object)
        tensor = httpclient.InferInput("text", [len(text)], "BYTES")
        tensor.set_data_from_numpy(text, binary_data=binary)
        # Binary: no outputs named, so tritonclient sets request parameter binary_data_output.
        outputs = None if binary else [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("upper", "length")]
        result = client.infer("echo_bytes", [tensor], outputs=outputs)
        tensors[f"{mode}/echo_bytes/text"] = text
        tensors[f"{mode}/echo_bytes/upper"] = result.as_numpy("upper")
        tensors[f"{mode}/echo_bytes/length"] = result.as_numpy("length")
        results[f"{mode}_echo_outputs"] = [
            {"name": o["name"], "binary": "data" not in o} for o in result.get_response()["outputs"]
        ]
    results["infer_ids"] = ids
    statistics = client.get_inference_statistics("simple")["model_stats"][0]
    results["statistics"] = {"inference_count": statistics["inference_count"], "name": statistics["name"]}
    errors = {}
    only_one = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    only_one.set_data_from_numpy(np.zeros((1, 16), np.float32))
    for label, model in (("missing_input", "simple"), ("unknown_model", "no_such_model")):
        try:
            client.infer(model, [only_one])
            errors[label] = None
        except InferenceServerException as error:
            errors[label] = {"status": error.status(), "message": error.message()}
    results["errors"] = errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    client = httpclient.InferenceServerClient(url=args.url, network_timeout=120.0)
    results: dict = {}
    tensors: dict = {}
    try:
        run(client, results, tensors)
    finally:
        client.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    np.savez(args.out / "tensors.npz", **tensors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
