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

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tensorfleet.coordinator.cli import finished
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


#: What the quick answer must not import (cli/finished.py): the engine and everything it brings.
ENGINE = ("numpy", "grpc", "pydantic", "h5py", "pyarrow", "pandas", "anndata", "scipy", "torch",
          "tensorfleet.coordinator.workflows", "tensorfleet.coordinator.engine", "tensorfleet.coordinator.io")


def rerun_in_process(job: Path, *args: str) -> tuple[int, str, list[str]]:
    """`tensorfleet run JOB ARGS` in a fresh interpreter: (exit code, stdout, the engine modules it imported)."""
    code = textwrap.dedent("""
        import contextlib, io, json, sys
        from tensorfleet.coordinator import cli
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["run", *sys.argv[1:]])
        print(json.dumps({"code": code, "out": out.getvalue(), "modules": sorted(sys.modules)}))
    """)
    done = subprocess.run([sys.executable, "-c", code, str(job), *args], capture_output=True, text=True,
                          timeout=240, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    engine = [m for m in report["modules"] if any(m == n or m.startswith(n + ".") for n in ENGINE)]
    return report["code"], report["out"], engine


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

    # answered before the engine is imported (cli/finished.py): no server, no reader, no numpy
    code, out, engine = rerun_in_process(job)
    assert (code, engine) == (0, []), (code, engine)
    assert rows_computed(out) == 0 and str(outputs[0]) in out, out

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


def test_the_quick_answer_goes_the_long_way_once_anything_changed(tmp_path):
    """cli/finished.py answers only for the job exactly as it finished: a touched input, a deleted
    output, an edited job file, another --limit or a run of the folder since each send the command
    down the long way (the engine's own checks), which answers right and leaves a new stamp."""
    job, top, outputs, total = plain(tmp_path)
    assert finished._IDENTITY_NAME == IDENTITY_NAME
    assert run_tensorfleet("run", job).returncode == 0
    assert (top / finished.STAMP_NAME).is_file()
    assert rerun_in_process(job)[2] == []

    os.utime(tmp_path / "in.fasta")  # same bytes, new mtime: the long way, which finds it unchanged
    code, out, engine = rerun_in_process(job)
    assert code == 0 and engine and rows_computed(out) == 0, out
    assert rerun_in_process(job)[2] == []  # the long way left a new stamp

    outputs[0].unlink()  # the long way merges it again
    code, out, engine = rerun_in_process(job)
    assert code == 0 and engine and outputs[0].is_file(), out
    assert rerun_in_process(job)[2] == []

    job.write_text(job.read_text() + "# a comment changes no result\n")
    code, out, engine = rerun_in_process(job)
    assert code == 0 and engine and rows_computed(out) == 0, out

    code, out, engine = rerun_in_process(job, "--limit", "50")  # another output and folder: computed
    assert code == 0 and engine and rows_computed(out) == 50, out

    code, out, engine = rerun_in_process(job, "--retry-failed")  # asks for work: never answered quickly
    assert code == 0 and engine, out
    code, out, engine = rerun_in_process(job, "--restart")
    assert code == 0 and engine and rows_computed(out) == total, out
    assert rerun_in_process(job)[2] == []

    make_fasta(tmp_path / "in.fasta", 200, seed=9)  # changed input: refused by the engine, as before
    refused = run_tensorfleet("run", job)
    assert refused.returncode == 2 and "in.fasta changed since this job began" in refused.stderr, refused.stderr


def test_a_run_of_the_folder_since_the_stamp_voids_it(tmp_path):
    """Another entry point (the service, a --dry-run is not one) that runs the folder rewrites
    job.json when it starts: the stamp, made before, no longer answers."""
    job, top, _, _ = plain(tmp_path)
    assert run_tensorfleet("run", job).returncode == 0
    assert run_tensorfleet("run", job, "--dry-run").returncode == 0
    assert rerun_in_process(job)[2] == []  # a dry run changes nothing
    identity = top / IDENTITY_NAME
    identity.write_text(identity.read_text())  # what any run's start does
    code, out, engine = rerun_in_process(job)
    assert code == 0 and engine and rows_computed(out) == 0, out
