"""Prometheus metrics: requests, rows, batch sizes, queue and compute time, errors, device memory."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    """One registry per server process, so tests can run several servers side by side."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tensorfleet_requests", "Inference requests", ["model", "outcome"], registry=r)
        self.rows = Counter("tensorfleet_rows", "Rows inferred", ["model"], registry=r)
        self.errors = Counter("tensorfleet_errors", "Failed requests by status code", ["model", "code"], registry=r)
        self.batch_size = Histogram(
            "tensorfleet_batch_size_rows", "Rows per executed batch", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "tensorfleet_queue_seconds", "Time requests waited for a batch", ["model"], buckets=_TIME_BUCKETS, registry=r
        )
        self.compute_seconds = Histogram(
            "tensorfleet_compute_seconds", "Time per executed batch", ["model"], buckets=_TIME_BUCKETS, registry=r
        )
        self.device_memory = Gauge(
            "tensorfleet_device_memory_bytes", "Device memory", ["device", "kind"], registry=r
        )
        self.queue_depth = Gauge("tensorfleet_queue_depth", "Requests waiting", ["model"], registry=r)
        self._ok: dict[str, Counter] = {}  # requests{model, outcome="ok"} per model

    def batch_observer(self, model: str) -> Callable[[int, float, float], None]:
        # the labelled children once per model, not a labels() lookup (lock, tuple, dict) per batch
        rows, batch_size = self.rows.labels(model), self.batch_size.labels(model)
        queue_seconds, compute_seconds = self.queue_seconds.labels(model), self.compute_seconds.labels(model)

        def observe(rows_in_batch: int, queued: float, computed: float) -> None:
            rows.inc(rows_in_batch)
            batch_size.observe(rows_in_batch)
            queue_seconds.observe(queued)
            compute_seconds.observe(computed)

        return observe

    def request_done(self, model: str, code: str | None) -> None:
        if code is None:  # the common case: one cached child per model
            ok = self._ok.get(model)
            if ok is None:
                ok = self._ok[model] = self.requests.labels(model, "ok")
            ok.inc()
            return
        self.requests.labels(model, "error").inc()
        self.errors.labels(model, code).inc()
