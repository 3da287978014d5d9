"""Caps on work held at once, each a clear error: requests in flight on one stream (model server)
and jobs waiting in the coordinator's queue."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tensorfleet.client import CoordinatorClient, InferenceClient, ResourceExhausted
from tensorfleet.client.coordinator_client import job_state
from tests.coordinator.helpers import make_fasta
from tests.serving import REPO_ROOT

from .helpers import spawned


def test_requests_beyond_the_stream_cap_are_refused_one_by_one(tmp_path):
    shutil.copytree(REPO_ROOT / "tests" / "models" / "slow_identity", tmp_path / "repo" / "slow_identity")
    config = tmp_path / "repo" / "slow_identity" / "config.yaml"
    config.write_text(config.read_text().replace("delay_ms: 50", "delay_ms: 1500"))
    args = ["serve", "--model-repository", tmp_path / "repo", "--max-stream-in-flight", "2"]
    with spawned(args, tmp_path / "run") as server, InferenceClient(server.address) as client:
        rows = [{"x": np.full((1, 2), i, np.float32)} for i in range(12)]
        results = list(client.stream("slow_identity", rows, window=12, return_exceptions=True))
        refused = [r for r in results if isinstance(r, Exception)]
        answered = [r for r in results if not isinstance(r, Exception)]
        assert refused and answered, results
        assert all(isinstance(r, ResourceExhausted) and "--max-stream-in-flight" in r.message for r in refused)
        assert client.infer("slow_identity", {"x": np.ones((1, 2), np.float32)})["y"][0, 0] == 1


def test_jobs_beyond_the_queue_cap_are_resource_exhausted(tmp_path):
    make_fasta(tmp_path / "in.fasta", 4)
    spec = {"input": {"path": "in.fasta"}, "model": {"name": "embed", "servers": ["127.0.0.1:1"]},
            "output": {"path": "out.h5"}, "policy": {"server_wait_s": 60}}
    args = ["coordinator", "serve", "--state-dir", tmp_path / "state", "--max-jobs", "1", "--max-queued-jobs", "1",
            "--data-root", tmp_path, "--output-root", tmp_path]
    with spawned(args, tmp_path) as service, CoordinatorClient(service.address) as client:
        first = client.submit({**spec, "name": "first"}, base_dir=tmp_path)
        _wait_running(client, first.job_id)
        second = client.submit({**spec, "name": "second", "output": {"path": "second.h5"}}, base_dir=tmp_path)
        with pytest.raises(ResourceExhausted, match="--max-queued-jobs"):
            client.submit({**spec, "name": "third", "output": {"path": "third.h5"}}, base_dir=tmp_path)
        assert [job.name for job in client.jobs()] == ["first", "second"]
        for job in (second, first):
            client.cancel(job.job_id)
        assert all(job_state(client.wait(job.job_id)) == "CANCELLED" for job in (first, second))
        assert not (tmp_path / "third.h5").exists()


def _wait_running(client, job_id: str) -> None:
    import time

    deadline = time.monotonic() + 60
    while job_state(client.get(job_id)) != "RUNNING":
        assert time.monotonic() < deadline, "the first job never started"
        time.sleep(0.1)
