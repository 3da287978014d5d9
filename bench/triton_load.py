"""The load generator both servers get in bench.serve_overhead: Triton's `tritonclient.grpc`.

Runs as its own process (tritonclient registers protobuf package `inference`, as tensorfleet
and MLServer do, so it cannot share the bench's process). It reads the batches once
(--batches: one sequence per line, a blank line between batches), then serves commands on
stdin, one JSON object a line: {"url": "127.0.0.1:PORT", "model": NAME, "out": PATH}. For each
it sends every batch as one BYTES request `sequence` [rows], keeping --window requests in
flight (unary ModelInfer with async_infer, the same for every server), saves the `embedding`
outputs in order to PATH (.npy, [all rows, dim]) and answers {"seconds": ...} on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from bench.batch_file import read_batches

TIMEOUT_S = 120


def run(client: grpcclient.InferenceServerClient, model: str, batches: list[np.ndarray],
        window: int) -> tuple[float, list[np.ndarray]]:
    """Every batch once, `window` requests in flight; the outputs in batch order."""
    slots = threading.Semaphore(window)
    results: list = [None] * len(batches)
    done = threading.Event()
    remaining = [len(batches)]
    lock = threading.Lock()

    def finished(index: int, result, error) -> None:
        try:
            results[index] = error if error is not None else result.as_numpy("embedding")
        except Exception as failure:  # noqa: BLE001 - reported below, never lost in grpc's thread
            results[index] = failure
        finally:
            slots.release()
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

    outputs = [grpcclient.InferRequestedOutput("embedding")]
    started = time.perf_counter()
    for index, batch in enumerate(batches):
        tensor = grpcclient.InferInput("sequence", [len(batch)], "BYTES")
        tensor.set_data_from_numpy(batch)
        if not slots.acquire(timeout=TIMEOUT_S):
            raise SystemExit(f"{model}: no reply in {TIMEOUT_S} s")
        client.async_infer(model, [tensor], lambda result, error, i=index: finished(i, result, error), outputs=outputs)
    if not done.wait(TIMEOUT_S):
        raise SystemExit(f"{model}: no reply in {TIMEOUT_S} s")
    seconds = time.perf_counter() - started
    for result in results:
        if not isinstance(result, np.ndarray):
            raise SystemExit(f"{model}: {result}")
    return seconds, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=Path, required=True)
    parser.add_argument("--window", type=int, default=4)
    args = parser.parse_args()
    batches = read_batches(args.batches)
    clients: dict[str, grpcclient.InferenceServerClient] = {}
    for line in sys.stdin:
        command = json.loads(line)
        client = clients.setdefault(command["url"], grpcclient.InferenceServerClient(command["url"]))
        seconds, results = run(client, command["model"], batches, args.window)
        np.save(command["out"], np.concatenate(results))
        print(json.dumps({"seconds": seconds}), flush=True)
    for client in clients.values():
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
