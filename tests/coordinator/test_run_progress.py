"""engine/run_progress.py: one report for a workflow's parts, from files laid out as the engine
writes them (manifest.sqlite, status.json, workflow.json); no servers needed to check the sums."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tensorfleet.coordinator.engine.run_progress import job_progress, run_dirs


def _manifest(run_dir: Path, chunks: list[tuple[int, int, bool, int]]) -> None:
    """A manifest's chunks table: (start, stop, done, failed rows) per chunk."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(run_dir / "manifest.sqlite") as db:
        db.execute("CREATE TABLE chunks (idx INTEGER PRIMARY KEY, start INTEGER, stop INTEGER, done INTEGER, failed INTEGER)")
        db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?)",
                       [(i, start, stop, int(done), failed) for i, (start, stop, done, failed) in enumerate(chunks)])


def _status(run_dir: Path, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").write_text(json.dumps(fields))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_sweep_counts_unplanned_parts_sums_live_rates_and_merges_servers(tmp_path) -> None:
    job = tmp_path / "sweep.tfjob"
    parts = [{"label": f"model {m} source {s}", "model": m, "dir": f"{m}/{s}"} for m in ("a", "b") for s in ("x", "y")]
    job.mkdir()
    (job / "workflow.json").write_text(json.dumps({"kind": "models x sources", "name": "s", "output": "out", "parts": parts}))
    _manifest(job / "a" / "x", [(0, 10, True, 1), (10, 20, True, 0)])
    _status(job / "a" / "x", state="done", pid=_dead_pid(), rows_per_second=99.0, updated=1.0,
            servers=[{"address": "h:1", "alive": True, "rows": 20}])
    _manifest(job / "a" / "y", [(0, 16, True, 0), (16, 32, False, 0), (32, 40, False, 0)])
    _status(job / "a" / "y", state="running", pid=os.getpid(), rows_per_second=12.5, updated=2.0,
            servers=[{"address": "h:1", "alive": True, "rows": 16}, {"address": "h:2", "alive": False, "rows": 0}])

    report = job_progress(job)
    assert [p["rows"] for p in report["parts"]] == [20, 40, 20, 40]  # b's parts: the same sources' plans
    assert [p.get("estimated", False) for p in report["parts"]] == [False, False, True, True]
    assert (report["rows"], report["rows_done"], report["rows_failed"]) == (120, 36, 1)
    assert (report["chunks"], report["chunks_done"]) == (10, 3)
    assert report["rows_per_second"] == 12.5  # the running part's; a finished part's rate is over
    assert report["eta_seconds"] == round((120 - 36) / 12.5, 1)
    assert [(s["address"], s["alive"]) for s in report["servers"]] == [("h:1", True), ("h:2", False)]
    assert report["servers_alive"] == 1 and report["state"] == "running"
    assert run_dirs(job) == [job / "a" / "x", job / "a" / "y", job / "b" / "x", job / "b" / "y"]


def test_a_live_state_whose_process_is_gone_reads_stopped(tmp_path) -> None:
    plain = tmp_path / "plain.tfjob"
    _status(plain, state="starting", pid=_dead_pid())
    assert job_progress(plain)["state"] == "stopped"
    _status(plain, state="starting", pid=os.getpid())
    assert job_progress(plain)["state"] == "starting"

    stages = tmp_path / "pipeline.tfjob"
    stages.mkdir()
    (stages / "workflow.json").write_text(json.dumps({"kind": "multi-stage", "parts": [
        {"label": "stage 1 a", "dir": "stages/00-a"}, {"label": "stage 2 b", "dir": "stages/01-b"}]}))
    _manifest(stages / "stages" / "00-a", [(0, 8, True, 0), (8, 16, False, 0)])
    _status(stages / "stages" / "00-a", state="running", pid=_dead_pid(), rows_per_second=3.0,
            servers=[{"address": "h:1", "alive": True}])
    report = job_progress(stages)
    assert report["state"] == "stopped" and report["rows_per_second"] == 0.0
    assert [p["rows"] for p in report["parts"]] == [16, 16] and report["rows"] == 32  # stage 2 not planned yet
    assert job_progress(tmp_path / "nothing") == {}
