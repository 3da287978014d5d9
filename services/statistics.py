"""Per-model counters behind ModelStatistics and the Prometheus metrics.

A request's time is split into stages (`STAGES`, in the order a request meets them):
decode (request bytes -> arrays, on the event loop), queue (waiting for a batch and the model
thread), merge (stacking and padding the batch's requests), h2d (host-to-device copies),
compute (the model itself), d2h (device-to-host copies, with any narrowing cast), split (each
request's rows back, cast to its datatype) and encode (the reply). decode and encode are
per request, the others per batch (queue: per request). On a CUDA device h2d, compute and d2h
are device times from CUDA events; elsewhere wall times. A backend that cannot tell its
copies from its compute (a python model) reports the whole predict as compute.

Triton's own fields are filled from the same clock: compute_input = merge + h2d,
compute_infer = the predict call less h2d and d2h, compute_output = d2h + split, so the three
add up to the model thread's time per batch.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchSizeStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


STAGES = ("decode", "queue", "merge", "h2d", "compute", "d2h", "split", "encode")
#: what a backend's predict may report about itself (Backend.stage_ns)
DEVICE_STAGES = ("h2d", "compute", "d2h")


@dataclass
class ModelStats:
    inference_count: int = 0  # rows
    execution_count: int = 0  # batches run by the model
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    by_batch_size: dict[int, BatchSizeStats] = field(default_factory=lambda: defaultdict(BatchSizeStats))
    stages: dict[str, Duration] = field(default_factory=lambda: {name: Duration() for name in STAGES})
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_execution(self, rows: int, predict_ns: int, device: dict[str, int] | None = None) -> None:
        """One call of the model's predict on `rows` rows (after any out-of-memory halving).

        `device`: the backend's own h2d / compute / d2h split of that call, when it has one."""
        device = device or {}
        copies = device.get("h2d", 0) + device.get("d2h", 0)
        infer_ns = max(predict_ns - copies, 0)
        with self.lock:
            self.inference_count += rows
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            self.compute_infer.add(infer_ns)
            sized = self.by_batch_size[rows]
            sized.compute_infer.add(infer_ns)
            for name in DEVICE_STAGES:
                self.stages[name].add(device.get(name, predict_ns if name == "compute" and not device else 0))
            if device:  # batch_stats is per predict size: its copies; merge and split are per batch
                self.compute_input.add(device.get("h2d", 0), count=0)
                self.compute_output.add(device.get("d2h", 0), count=0)
                sized.compute_input.add(device.get("h2d", 0))
                sized.compute_output.add(device.get("d2h", 0))

    def record_io(self, input_ns: int, output_ns: int) -> None:
        """Merging inputs and splitting outputs of one dispatched batch."""
        with self.lock:
            self.compute_input.add(input_ns)
            self.compute_output.add(output_ns)
            self.stages["merge"].add(input_ns)
            self.stages["split"].add(output_ns)

    def record_stage(self, name: str, ns: int) -> None:
        """One request's decode or encode time (the batcher records the others)."""
        with self.lock:
            self.stages[name].add(ns)

    def record_request(self, ok: bool, total_ns: int, queue_ns: int) -> None:
        with self.lock:
            (self.success if ok else self.fail).add(total_ns)
            if ok:
                self.queue.add(queue_ns)
                self.stages["queue"].add(queue_ns)

    def mean_batch_size(self) -> float:
        with self.lock:
            return self.inference_count / self.execution_count if self.execution_count else 0.0
