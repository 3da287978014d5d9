"""Per-model counters behind ModelStatistics and the Prometheus metrics."""

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
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_execution(self, rows: int, infer_ns: int) -> None:
        """One call of the model's predict on `rows` rows (after any out-of-memory halving)."""
        with self.lock:
            self.inference_count += rows
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            self.compute_infer.add(infer_ns)
            self.by_batch_size[rows].compute_infer.add(infer_ns)

    def record_io(self, input_ns: int, output_ns: int) -> None:
        """Merging inputs and splitting outputs of one dispatched batch."""
        with self.lock:
            self.compute_input.add(input_ns)
            self.compute_output.add(output_ns)

    def record_request(self, ok: bool, total_ns: int, queue_ns: int) -> None:
        with self.lock:
            (self.success if ok else self.fail).add(total_ns)
            if ok:
                self.queue.add(queue_ns)

    def mean_batch_size(self) -> float:
        with self.lock:
            return self.inference_count / self.execution_count if self.execution_count else 0.0
