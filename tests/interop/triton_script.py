"""Drive a running tensorfleet server with Triton's own client, `tritonclient.grpc` 2.73.0.

Runs as its own process: tritonclient's generated modules register protobuf package
`inference`, as ours do, and the two cannot share a process. Writes `results.json`
(control-plane replies) and `tensors.npz` (every input sent and every output received) to
--out, so the test process compares them against the in-process model.

    python tests/interop/triton_script.py --url 127.0.0.1:PORT --out DIR basic
    python tests/interop/triton_script.py --url 127.0.0.1:PORT --out DIR protein --model NAME
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

SIMPLE_MODELS = {"simple": "FP32", "simple_int64": "INT64", "simple_fp16": "FP16"}
STREAM_REQUESTS = 100
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def _simple_inputs(datatype: str, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    if datatype == "INT64":
        return tuple(
            rng.integers(-(2**40), 2**40, size=(rows, 16), dtype=np.int64) for _ in range(2)
        )
    dtype = np.float16 if datatype == "FP16" else np.float32
    return tuple(rng.uniform(-100, 100, size=(rows, 16)).astype(dtype) for _ in range(2))


def _infer_simple(
    client: grpcclient.InferenceServerClient,
    model: str,
    datatype: str,
    a: np.ndarray,
    b: np.ndarray,
    rid: str,
) -> grpcclient.InferResult:
    inputs = [
        grpcclient.InferInput("INPUT0", list(a.shape), datatype),
        grpcclient.InferInput("INPUT1", list(b.shape), datatype),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    outputs = [
        grpcclient.InferRequestedOutput("OUTPUT0"),
        grpcclient.InferRequestedOutput("OUTPUT1"),
    ]
    return client.infer(model, inputs, outputs=outputs, request_id=rid)


def run_basic(client: grpcclient.InferenceServerClient, results: dict, tensors: dict) -> None:
    """Control plane, unary infer in FP32/INT64/FP16/BYTES, then 100 requests on one stream."""
    rng = np.random.default_rng(20240601)
    models = [*SIMPLE_MODELS, "echo_bytes"]
    results["server_live"] = client.is_server_live()
    results["server_ready"] = client.is_server_ready()
    results["model_ready"] = {name: client.is_model_ready(name) for name in models}
    results["server_metadata"] = client.get_server_metadata(as_json=True)
    results["model_metadata"] = {
        name: client.get_model_metadata(name, as_json=True) for name in models
    }
    results["model_config"] = {name: client.get_model_config(name, as_json=True) for name in models}
    results["repository_index"] = client.get_model_repository_index(as_json=True)

    infer_ids = {}
    for model, datatype in SIMPLE_MODELS.items():
        a, b = _simple_inputs(datatype, 3, rng)
        result = _infer_simple(client, model, datatype, a, b, f"unary-{model}")
        tensors[f"{model}/INPUT0"], tensors[f"{model}/INPUT1"] = a, b
        tensors[f"{model}/OUTPUT0"] = result.as_numpy("OUTPUT0")
        tensors[f"{model}/OUTPUT1"] = result.as_numpy("OUTPUT1")
        infer_ids[model] = result.get_response().id

    text = np.array(
        [b"hello", b"", "\u00e9t\u00e9 ok".encode(), b"\x00\xffbin", b"x" * 1000], dtype=object
    )
    inp = grpcclient.InferInput("text", [len(text)], "BYTES")
    inp.set_data_from_numpy(text)
    result = client.infer("echo_bytes", [inp], request_id="unary-echo_bytes")
    tensors["echo_bytes/text"] = text
    tensors["echo_bytes/upper"] = result.as_numpy("upper")
    tensors["echo_bytes/length"] = result.as_numpy("length")
    infer_ids["echo_bytes"] = result.get_response().id
    results["infer_ids"] = infer_ids

    only_one = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    only_one.set_data_from_numpy(np.zeros((1, 16), np.float32))
    try:
        client.infer("simple", [only_one])
        results["unary_error"] = None
    except InferenceServerException as error:
        results["unary_error"] = {"status": error.status(), "message": error.message()}

    run_stream(client, results, tensors, rng)


def run_stream(
    client: grpcclient.InferenceServerClient, results: dict, tensors: dict, rng: np.random.Generator
) -> None:
    """Send all 100 requests before reading any reply, so they are all in flight together."""
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        for index in range(STREAM_REQUESTS):
            rows = 1 + index % 4
            a, b = _simple_inputs("FP32", rows, rng)
            tensors[f"stream/{index}/INPUT0"], tensors[f"stream/{index}/INPUT1"] = a, b
            inputs = [
                grpcclient.InferInput("INPUT0", [rows, 16], "FP32"),
                grpcclient.InferInput("INPUT1", [rows, 16], "FP32"),
            ]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            client.async_stream_infer("simple", inputs, request_id=f"req-{index}")
            if index == STREAM_REQUESTS // 2:  # one bad request among the good ones
                client.async_stream_infer("simple", inputs[:1], request_id="bad-missing-input")
        errors, ids = [], []
        for _ in range(STREAM_REQUESTS + 1):
            result, error = replies.get(timeout=120)
            if error is not None:
                errors.append(str(error))
                continue
            rid = result.get_response().id
            ids.append(rid)
            index = rid.removeprefix("req-")
            tensors[f"stream/{index}/OUTPUT0"] = result.as_numpy("OUTPUT0")
            tensors[f"stream/{index}/OUTPUT1"] = result.as_numpy("OUTPUT1")
    finally:
        client.stop_stream()
    results["stream"] = {"ids": ids, "errors": errors}


def run_protein(
    client: grpcclient.InferenceServerClient, model: str, results: dict, tensors: dict
) -> None:
    """Unary and streamed BYTES sequences to the example protein model; outputs saved by id."""
    rng = np.random.default_rng(7)
    config = client.get_model_config(model, as_json=True)["config"]
    metadata = client.get_model_metadata(model, as_json=True)
    results["model_ready"] = client.is_model_ready(model)
    results["model_metadata"] = metadata
    results["model_config"] = config
    first = config["input"][0]
    dims = [int(d) for d in first.get("dims", [])]
    output_names = [output["name"] for output in config["output"]]

    def request_inputs(sequences: list[str]) -> list:
        shape = (
            [len(sequences), *[1] * len(dims)]
            if int(config.get("max_batch_size", 0)) > 0
            else [len(sequences)]
        )
        array = np.array([s.encode() for s in sequences], dtype=object).reshape(shape)
        tensor = grpcclient.InferInput(first["name"], shape, "BYTES")
        tensor.set_data_from_numpy(array)
        return [tensor]

    batches = []
    for index in range(12):
        rows = 1 + index % 3
        batches.append(
            ["".join(rng.choice(list(AMINO_ACIDS), size=rng.integers(5, 60))) for _ in range(rows)]
        )
    results["protein_sequences"] = batches
    results["protein_input"] = first["name"]
    results["protein_outputs"] = output_names

    unary = client.infer(model, request_inputs(batches[0]), request_id="protein-unary")
    for name in output_names:
        tensors[f"unary/{name}"] = unary.as_numpy(name)
    results["unary_id"] = unary.get_response().id

    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        for index, sequences in enumerate(batches):
            client.async_stream_infer(model, request_inputs(sequences), request_id=f"p-{index}")
        errors = []
        for _ in batches:
            result, error = replies.get(timeout=120)
            if error is not None:
                errors.append(str(error))
                continue
            index = result.get_response().id.removeprefix("p-")
            for name in output_names:
                tensors[f"stream/{index}/{name}"] = result.as_numpy(name)
    finally:
        client.stop_stream()
    results["stream_errors"] = errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("mode", choices=["basic", "protein"])
    parser.add_argument("--model", default="protein_embedder")
    args = parser.parse_args(argv)
    client = grpcclient.InferenceServerClient(url=args.url)
    results: dict = {}
    tensors: dict[str, np.ndarray] = {}
    try:
        if args.mode == "basic":
            run_basic(client, results, tensors)
        else:
            run_protein(client, args.model, results, tensors)
    finally:
        client.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    np.savez(args.out / "tensors.npz", **tensors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
