"""A run is phases entered once each, with frozen hand-offs (coordinator/engine/job.py, run_types.py).

The job runs in this process against real servers; each phase function is wrapped to count its
calls, for a fresh run, a resume with a chunk left to compute, and a resume of finished work
whose output is gone (a manifest read and a merge: no server started, nothing dispatched).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import h5py
import pytest

from tensorfleet.coordinator.engine import job, plan_phase, run_types
from tensorfleet.coordinator.engine.manifest import MANIFEST_NAME, Manifest
from tensorfleet.coordinator.workflows import api

from .helpers import make_fasta, write_job

PHASES = {
    job: ("plan_fresh", "check_resumed", "start_fleet", "dispatch", "merge_output", "adapt_run", "plan_settings"),
    plan_phase: ("plan_settings",),
}


@pytest.fixture
def calls(monkeypatch) -> Counter:
    counted: Counter = Counter()
    for module, names in PHASES.items():
        for name in names:
            original = getattr(module, name)

            def wrapper(*args, _name=name, _original=original, **kwargs):
                counted[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, wrapper)
    return counted


def _job(tmp_path, servers):
    make_fasta(tmp_path / "in.fasta", 120)
    return write_job(
        tmp_path / "job.yaml", input={"path": "in.fasta"}, model={"name": "embed", "servers": [s.address for s in servers]},
        output={"path": "out.h5"}, chunking={"chunk_rows": 40, "batch_rows": 8},
    )


def _ids(path):
    with h5py.File(path) as f:
        return [v.decode() for v in f["ids"][:]]


def test_each_phase_is_entered_once_fresh_and_on_resume(tmp_path, servers, calls):
    spec = api.load(_job(tmp_path, servers))
    fresh = api.run(spec, api.RunOptions())
    assert fresh.rows == 120 and fresh.rows_failed == 0
    assert calls == Counter(plan_fresh=1, adapt_run=1, plan_settings=1, start_fleet=1, dispatch=1, merge_output=1)
    reference = _ids(tmp_path / "out.h5")

    job_dir = tmp_path / "out.h5.tfjob"
    manifest = Manifest(job_dir / MANIFEST_NAME)
    try:
        manifest.reset_chunks([1])  # one chunk left to compute
    finally:
        manifest.close()
    calls.clear()
    resumed = api.run(spec, api.RunOptions(resume=True))
    assert resumed.rows_computed == 40
    # one plan_settings (the same function a fresh run plans with): no shadow plan
    assert calls == Counter(check_resumed=1, adapt_run=1, plan_settings=1, start_fleet=1, dispatch=1, merge_output=1)
    assert _ids(tmp_path / "out.h5") == reference

    (tmp_path / "out.h5").unlink()
    calls.clear()
    merged_again = api.run(spec, api.RunOptions(resume=True))
    assert merged_again.rows_computed == 0 and merged_again.servers == []
    assert calls == Counter(check_resumed=1, adapt_run=1, merge_output=1)
    assert _ids(tmp_path / "out.h5") == reference


def test_the_hand_offs_are_frozen():
    for handoff in (run_types.RunContext, run_types.StageHooks, run_types.Adapted, run_types.Planned,
                    run_types.Serving, run_types.Dispatched):
        assert dataclasses.is_dataclass(handoff) and handoff.__dataclass_params__.frozen, handoff
