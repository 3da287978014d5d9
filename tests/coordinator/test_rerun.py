"""Re-running a job (issue 29): the contract for pipeline managers (docs/coordinator.md, "Re-running a job").

`tensorfleet run JOB` with no flag continues a job folder that holds the same job, and a finished
one is a quick exit 0 that names its output and starts no server; `--restart` starts over; a
changed job is refused with the difference named; `--resume` is still accepted.

For each job kind (plain, multi-stage, models x sources, in-context) the first run is killed
(kill -9, at the coordinator's `part_renamed` crash point: a part durable, its chunk not yet
committed), the same command continues it, computing only what was not committed, and a third
run of the same command computes nothing. "No server started" is read from the evidence a local
fleet leaves: each start writes `servers/server-N.log` in its run's folder, and the tests delete
those folders before the re-run. Timings are printed, never asserted.
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from tensorfleet.coordinator.engine.rerun import IDENTITY_NAME, differences, job_identity
from tensorfleet.coordinator.spec.kinds import load_job

from .helpers import REPO_ROOT, local_model, make_fasta, run_tensorfleet, write_job

CRASH = {"TENSORFLEET_CRASH_AT": "part_renamed:3"}


def server_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("servers") if p.is_dir())


def committed_rows(top: Path) -> int:
    """Rows committed in every run folder under `top` (a plain job's folder is one)."""
    total = 0
    for path in top.rglob("manifest.sqlite"):
        with sqlite3.connect(path) as db:
            try:
                total += db.execute("SELECT COALESCE(SUM(stop - start), 0) FROM chunks WHERE done = 1").fetchone()[0]
            except sqlite3.OperationalError:  # a manifest created, its plan not yet written
                pass
    return total


def rows_computed(stdout: str) -> int:
    line = next(line for line in stdout.splitlines() if line.startswith(("speed:", "nothing computed:")))
    return 0 if line.startswith("nothing computed:") else int(line.split()[1])


def plain(root: Path) -> tuple[Path, Path, list[Path], int]:
    make_fasta(root / "in.fasta", 200)
    job = write_job(root / "job.yaml", input={"path": "in.fasta"}, model=local_model("embed"),
                    output={"path": "out.h5"}, chunking={"chunk_rows": 32, "batch_rows": 8})
    return job, root / "out.h5.tfjob", [root / "out.h5"], 200


def multi_stage(root: Path) -> tuple[Path, Path, list[Path], int]:
    make_fasta(root / "in.fasta", 200)
    (root / "job.yaml").write_text(yaml.safe_dump({
        "name": "two-stages", "input": {"path": "in.fasta"}, "output": {"path": "out.parquet"},
        "stages": [
            {"name": "embed", "model": local_model("embed"), "batch_rows": 8},
            {"name": "head", "model": {**local_model("head16"), "parameters": {"steps": 3}}, "tensors": {"x": "embedding"}},
        ],
        "chunking": {"chunk_rows": 32},
    }))
    return root / "job.yaml", root / "out.parquet.tfjob", [root / "out.parquet"], 400  # 200 rows x 2 stages


def sweep(root: Path) -> tuple[Path, Path, list[Path], int]:
    make_fasta(root / "a.fasta", 120, seed=1)
    make_fasta(root / "b.fasta", 80, seed=2)
    (root / "job.yaml").write_text(yaml.safe_dump({
        "name": "sweep", "sources": [{"name": "a", "path": "a.fasta"}, {"name": "b", "path": "b.fasta"}],
        "models": [{**local_model("embed"), "batch_rows": 8}], "output": {"dir": "sheets"},
        "chunking": {"chunk_rows": 32},
    }))
    return root / "job.yaml", root / "sheets" / ".sweep.tfjob", [root / "sheets" / "embed.parquet"], 200


def in_context(root: Path) -> tuple[Path, Path, list[Path], int]:
    """The STACK example (400 query cells, a prompt run and a control run of 128-row chunks)."""
    shutil.copytree(REPO_ROOT / "examples" / "stack", root / "stack",
                    ignore=shutil.ignore_patterns("output", "*.tfjob", "__pycache__"))
    job = root / "stack" / "stack.yaml"
    spec = yaml.safe_load(job.read_text())
    spec["model"]["parameters"] = {"steps": 5}
    job.write_text(yaml.safe_dump(spec))
    return job, root / "stack" / "output" / "predictions.h5ad.tfjob", [root / "stack" / "output" / "predictions.h5ad"], 800


KINDS = {"plain": plain, "multi-stage": multi_stage, "models x sources": sweep, "in-context": in_context}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_killed_job_continues_and_a_finished_one_exits_0_at_once_with_no_server(tmp_path, kind):
    job, top, outputs, total = KINDS[kind](tmp_path)  # total: rows committed over every run folder
    killed = run_tensorfleet("run", job, env=CRASH)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    kept = committed_rows(top)
    assert 0 < kept < total, f"{kept} rows committed before the kill"

    continued = run_tensorfleet("run", job)  # the same command, no flag
    assert continued.returncode == 0, continued.stderr
    assert rows_computed(continued.stdout) <= total - kept < total, continued.stdout
    assert committed_rows(top) == total
    assert all(path.is_file() for path in outputs)

    for folder in server_folders(tmp_path):
        shutil.rmtree(folder)
    stamps = [path.stat().st_mtime_ns for path in outputs]
    started = time.monotonic()
    again = run_tensorfleet("run", job)
    seconds = time.monotonic() - started
    print(f"{kind}: re-run of the finished job took {seconds:.2f}s (exit {again.returncode})")
    assert again.returncode == 0, again.stderr
    assert server_folders(tmp_path) == [], "a finished job started a server"
    assert rows_computed(again.stdout) == 0
    assert any(str(outputs[0]) in line for line in again.stdout.splitlines()), again.stdout  # names its output
    assert [path.stat().st_mtime_ns for path in outputs] == stamps, "a finished job rewrote its output"

    resumed = run_tensorfleet("run", job, "--resume")  # accepted, and now means what no flag means
    assert resumed.returncode == 0 and rows_computed(resumed.stdout) == 0, resumed.stderr


def test_a_changed_job_is_refused_naming_the_difference_and_restart_starts_over(tmp_path):
    job, top, outputs, total = plain(tmp_path)
    assert run_tensorfleet("run", job).returncode == 0
    spec = yaml.safe_load(job.read_text())
    spec["model"]["parameters"] = {"steps": 20}
    spec["chunking"]["chunk_rows"] = 64
    job.write_text(yaml.safe_dump(spec))
    refused = run_tensorfleet("run", job)
    assert refused.returncode == 2
    assert "chunking.chunk_rows 32 -> 64" in refused.stderr and "model.parameters.steps (unset) -> 20" in refused.stderr
    assert "--restart" in refused.stderr and "Traceback" not in refused.stderr

    make_fasta(tmp_path / "in.fasta", 200, seed=9)
    refused = run_tensorfleet("run", job)
    assert refused.returncode == 2 and "in.fasta changed since this job began" in refused.stderr, refused.stderr

    restarted = run_tensorfleet("run", job, "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert rows_computed(restarted.stdout) == total
    again = run_tensorfleet("run", job)
    assert again.returncode == 0 and rows_computed(again.stdout) == 0, again.stderr


def test_how_servers_are_reached_is_not_part_of_the_job(tmp_path):
    """Another fleet (`--servers`, a new token, more local servers) or another retry policy
    computes the same rows: the folder is continued, not refused."""
    job, _, _, _ = plain(tmp_path)
    spec = load_job(job)
    base = job_identity(spec)
    other = spec.model_copy(update={
        "model": spec.model.model_copy(update={"servers": ["127.0.0.1:1"], "local": None, "token": "t"}),
        "policy": spec.policy.model_copy(update={"retries": 9, "window": 1}),
    })
    assert differences(base.to_json(), job_identity(other)) == []
    changed = spec.model_copy(update={"model": spec.model.model_copy(update={"parameters": {"steps": 2}})})
    assert differences(base.to_json(), job_identity(changed)) == ["model.parameters.steps (unset) -> 2"]


def test_a_folder_from_before_job_json_is_continued(tmp_path):
    """Job folders written before the identity file existed continue as `--resume` continued them."""
    job, top, _, total = plain(tmp_path)
    killed = run_tensorfleet("run", job, env=CRASH)
    assert killed.returncode == -signal.SIGKILL
    (top / IDENTITY_NAME).unlink()
    continued = run_tensorfleet("run", job)
    assert continued.returncode == 0, continued.stderr
    assert rows_computed(continued.stdout) < total and (top / IDENTITY_NAME).is_file()


def test_a_changed_stage_or_source_is_named_by_its_name(tmp_path):
    """Lists of stages, models and sources are compared item by item, each named."""
    multi_stage(tmp_path)
    spec = load_job(tmp_path / "job.yaml")
    before = job_identity(spec).to_json()
    stages = [spec.stages[0], spec.stages[1].model_copy(update={
        "model": spec.stages[1].model.model_copy(update={"parameters": {"steps": 4}})})]
    changed = job_identity(spec.model_copy(update={"stages": stages}))
    assert differences(before, changed) == ["stages[head].model.parameters.steps 3 -> 4"]
    sweep(tmp_path)
    spec = load_job(tmp_path / "job.yaml")
    before = job_identity(spec).to_json()
    sources = [spec.sources[0], spec.sources[1].model_copy(update={"path": str(tmp_path / "a.fasta")})]
    assert differences(before, job_identity(spec.model_copy(update={"sources": sources}))) == [
        f"sources[b].path {str(tmp_path / 'b.fasta')!r} -> {str(tmp_path / 'a.fasta')!r}"]
