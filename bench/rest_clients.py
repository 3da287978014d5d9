"""Triton's own Python clients, one request in flight, against a server's REST and gRPC ports.

Run by `python -m bench.rest --sequential` as a process of its own: tritonclient.grpc and
tensorfleet both register a protobuf package named `inference`, so they cannot share one. Per
case (a model and a tensor size), `--rounds` x `--requests` calls of tritonclient.http (binary
tensor data, one keep-alive connection, the client's defaults otherwise) and as many of
tritonclient.grpc, taking turns call by call (so that a burst of load on a shared machine
falls on both); every reply is checked. Prints one JSON object: per case and protocol the
median, p90 and mean milliseconds of a call.

    python bench/rest_clients.py --http 127.0.0.1:P --grpc 127.0.0.1:Q --case simple:16 --case identity_fp32:16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", required=True)
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--case", action="append", required=True,
                        help="MODEL:ELEMENTS; `simple` takes two [1,16] FP32 inputs, any other model one FP32 `x`")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


def caller(module, client, model: str, elements: int):
    """A function making one call of `model` and checking the reply."""
    rng = np.random.default_rng(elements)
    if model == "simple":
        a, b = (rng.uniform(-10, 10, (1, 16)).astype(np.float32) for _ in range(2))
        inputs = [module.InferInput("INPUT0", [1, 16], "FP32"), module.InferInput("INPUT1", [1, 16], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        outputs = [module.InferRequestedOutput("OUTPUT0"), module.InferRequestedOutput("OUTPUT1")]

        def call() -> None:
            result = client.infer(model, inputs, outputs=outputs)
            assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
    else:
        x = rng.standard_normal(elements).astype(np.float32)
        inputs = [module.InferInput("x", [elements], "FP32")]
        inputs[0].set_data_from_numpy(x)
        outputs = [module.InferRequestedOutput("y")]

        def call() -> None:
            result = client.infer(model, inputs, outputs=outputs)
            assert result.as_numpy("y").tobytes() == x.tobytes()

    return call


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in seconds)
    return {"median_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
            "mean_ms": round(statistics.fmean(ms), 3), "calls": len(ms)}


def main() -> int:
    args = parse_args()
    http = httpclient.InferenceServerClient(args.http, network_timeout=120, connection_timeout=30)
    grpc = grpcclient.InferenceServerClient(args.grpc)
    results = {}
    for case in args.case:
        model, _, elements = case.partition(":")
        calls = {"http": caller(httpclient, http, model, int(elements)),
                 "grpc": caller(grpcclient, grpc, model, int(elements))}
        laps: dict[str, list[float]] = {"http": [], "grpc": []}
        for call in calls.values():  # warm both paths, and check them
            for _ in range(5):
                call()
        for _ in range(args.rounds * args.requests):  # call by call in turn: both sides see the same load
            for side, call in calls.items():
                started = time.perf_counter()
                call()
                laps[side].append(time.perf_counter() - started)
        rows = {side: summary(seconds) for side, seconds in laps.items()}
        rows["ratio_http_over_grpc_median"] = round(rows["http"]["median_ms"] / rows["grpc"]["median_ms"], 3)
        results[case] = rows
    http.close()
    grpc.close()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
