"""`tensorfleet slurm`: the batch script it writes, its step helpers, and a real run on a
one-node SLURM cluster (Debian's slurm-wlm, started here and stopped by pid).

The end-to-end test submits with the real `sbatch`: two CPU model servers start as the tasks
of an srun step, the coordinator step waits for their gRPC health and runs the job, and the
output must equal what `tensorfleet run` writes for the same spec with its own local servers.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from tensorfleet.coordinator.fleet import slurm
from tensorfleet.services.cli import build_parser
from tests.deploy.slurm_cluster import SlurmCluster, SlurmUnavailable
from tests.serving import REPO_ROOT

MODELS = REPO_ROOT / "tests" / "models"
ROWS = 240


@functools.cache
def _tensorfleet_slurm() -> tuple[str, ...]:
    """`tensorfleet slurm` once the CLI has it; until then the module's own copy of the command."""
    probe = subprocess.run(
        [sys.executable, "-m", "tensorfleet.coordinator", "slurm", "--help"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )
    if probe.returncode == 0:
        return (sys.executable, "-m", "tensorfleet.coordinator", "slurm")
    return (sys.executable, "-m", "tensorfleet.coordinator.fleet.slurm", "slurm")


def _write_job(folder: Path, name: str, output: str, token: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "in.h5"
    if not data.exists():
        rng = np.random.default_rng(20261123)
        with h5py.File(data, "w") as handle:
            handle["a"] = rng.standard_normal((ROWS, 16)).astype(np.float32)
            handle["b"] = rng.standard_normal((ROWS, 16)).astype(np.float32)
    spec = {
        "name": name,
        "input": {"path": "in.h5", "tensors": {"INPUT0": "a", "INPUT1": "b"}},
        "model": {"name": "simple", "local": {"repository": str(MODELS), "count": 2},
                  **({"token": token} if token else {})},
        "output": {"path": output},
        "chunking": {"chunk_rows": 40, "batch_rows": 8},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _dry_run(job: Path, *flags: str) -> str:
    done = subprocess.run(
        [*_tensorfleet_slurm(), str(job), "--dry-run", *flags],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _server_args(script: str) -> list[str]:
    """The model server's arguments, as the script passes them after `serve-task ... --`."""
    lines = script.splitlines()
    index = next(i for i, line in enumerate(lines) if "serve-task" in line)
    return shlex.split(lines[index + 1].rstrip("&").strip())


@pytest.mark.parametrize("flags", [["--gpus", "4"], ["--gpus", "2", "--cpu", "--cpus-per-task", "2"]])
def test_dry_run_prints_a_script_that_bash_accepts(tmp_path: Path, flags: list[str]) -> None:
    job = _write_job(tmp_path, "dry", "out.h5")
    script = _dry_run(job, *flags, "--partition", "gpu", "--time", "01:00:00")
    checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    assert not (tmp_path / "dry.slurm").exists(), "--dry-run must write nothing"

    count = int(flags[1])
    assert f"#SBATCH --ntasks={count}" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=01:00:00" in script
    server_step = next(line for line in script.splitlines() if line.startswith("srun ") and "serve-task" not in line
                       and "--kill-on-bad-exit" in line)
    assert "--overlap" in server_step and f"--ntasks={count}" in server_step
    args = build_parser().parse_args(_server_args(script))  # the server accepts what the script passes
    assert args.model_repository == MODELS and args.models == ["simple"]
    if "--cpu" in flags:
        assert args.device == "cpu" and args.threads == 2
        assert "gpus-per-task" not in script
    else:  # each task is bound to its own GPU by SLURM and sees it as cuda:0
        assert args.device == "cuda:0"
        assert "#SBATCH --gpus-per-task=1" in script and "--gpus-per-task=1" in server_step
    # every step runs the absolute python of this environment
    assert f"PYTHON=({shlex.quote(sys.executable)})" in script
    assert script.count("srun --overlap") == 3


def test_container_runs_every_step_in_the_image(tmp_path: Path) -> None:
    job = _write_job(tmp_path, "boxed", "out.h5")
    script = _dry_run(job, "--gpus", "2", "--container", "tensorfleet.sif")
    assert subprocess.run(["bash", "-n"], input=script, text=True, timeout=30).returncode == 0
    image = REPO_ROOT / "tensorfleet.sif"
    assert f"PYTHON=(apptainer exec --nv {shlex.quote(str(image))} python)" in script
    assert script.count('"${PYTHON[@]}" -m tensorfleet.coordinator') == 3


def test_a_job_with_running_servers_needs_a_model_repository(tmp_path: Path) -> None:
    job = tmp_path / "remote.yaml"
    job.write_text(yaml.safe_dump({
        "name": "remote", "input": {"path": "in.h5", "tensors": {"INPUT0": "a", "INPUT1": "b"}},
        "model": {"name": "simple", "servers": ["node1:8001"]}, "output": {"path": "out.h5"},
    }))
    with pytest.raises(slurm.SlurmError, match="--model-repository"):
        slurm.render_batch_script(job, 2)
    script = slurm.render_batch_script(job, 2, model_repository=MODELS, devices="cpu")
    assert str(MODELS) in script
    with pytest.raises(slurm.SlurmError, match="--time"):
        slurm.render_batch_script(job, 1, model_repository=MODELS, time="1 hour; rm -rf /")


def test_submit_says_clearly_when_sbatch_is_missing() -> None:
    with pytest.raises(slurm.SlurmError, match="not on PATH"):
        slurm.submit("#!/bin/bash\n", env={"PATH": "/nonexistent"})


def test_serve_task_reports_its_address_and_drains_on_the_stop_file(tmp_path: Path) -> None:
    from tensorfleet.client import InferenceClient
    from tensorfleet.client.errors import Unauthenticated

    hostfile = tmp_path / "servers"
    task = subprocess.Popen(  # the batch script exports the job's token; the server requires it
        [sys.executable, "-m", "tensorfleet.coordinator.fleet.slurm", "serve-task", "--hostfile", str(hostfile),
         "--host", "127.0.0.1", "--", "--model-repository", str(MODELS), "--model", "simple",
         "--host", "127.0.0.1"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "TENSORFLEET_TOKEN": "t0ken"},
    )
    try:
        servers = slurm.wait_healthy(hostfile, 1, timeout=120, model="simple", token="t0ken")
        assert len(servers) == 1 and servers[0].startswith("127.0.0.1:")
        inputs = {"INPUT0": np.ones((2, 16), np.float32), "INPUT1": np.ones((2, 16), np.float32)}
        with InferenceClient(servers[0]) as client, pytest.raises(Unauthenticated):
            client.infer("simple", inputs)
        with InferenceClient(servers[0], token="t0ken") as client:
            out = client.infer("simple", inputs)
        assert np.array_equal(out["OUTPUT0"], np.full((2, 16), 2.0, np.float32))
        slurm.stop_file(hostfile).touch()
        assert task.wait(60) == 0
        assert not _port_open(servers[0])
    finally:
        if task.poll() is None:
            task.kill()
            task.wait(10)


def test_wait_healthy_fails_fast_when_a_server_died(tmp_path: Path) -> None:
    hostfile = tmp_path / "servers"
    task = subprocess.run(
        [sys.executable, "-m", "tensorfleet.coordinator.fleet.slurm", "serve-task", "--hostfile", str(hostfile),
         "--host", "127.0.0.1", "--", "--model-repository", str(tmp_path / "no-such-repository")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert task.returncode != 0
    started = time.monotonic()
    with pytest.raises(slurm.SlurmError, match="failed to start: 127.0.0.1: server exited with"):
        slurm.wait_healthy(hostfile, 2, timeout=600)
    assert time.monotonic() - started < 60  # a dead server is reported at once, not at the timeout


def _port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------ real SLURM


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a one-node SLURM cluster needs Linux and root (slurmd runs jobs as any user)")
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="tf-slurm-cluster-")))
    try:
        cluster.start()
    except (SlurmUnavailable, OSError, subprocess.SubprocessError) as error:
        cluster.stop()
        pytest.skip(f"SLURM cannot run here: {error}")
    try:
        yield cluster
    finally:
        subprocess.run(["scancel", "--user", "root"], env=cluster.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            queue = subprocess.run(["squeue", "-h"], env=cluster.env, capture_output=True, text=True, timeout=30)
            if not queue.stdout.strip():
                break
            time.sleep(0.5)
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def _wait_for_job(cluster: SlurmCluster, job_id: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=cluster.env,
                               capture_output=True, text=True, timeout=30)
        fields = dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return fields
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=cluster.env, capture_output=True, timeout=30)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {fields}\n{cluster.logs()}")


def _datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        return {name: handle[name][()] for name in ("ids", "ok", "OUTPUT0", "OUTPUT1")}


def test_tensorfleet_slurm_runs_the_job_on_srun_servers(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # with a token: the srun servers require it, so the health wait and the run must send it
    job = _write_job(tmp_path, "viaslurm", "slurm-out.h5", token="s3cret-token")
    submitted = subprocess.run(
        [*_tensorfleet_slurm(), str(job), "--cpu", "--gpus", "2", "--startup-timeout", "90"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=slurm_cluster.env, timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split("submitted batch job ")[1].split()[0]
    state = _wait_for_job(slurm_cluster, job_id, timeout=120)
    run_dir = tmp_path / "viaslurm.slurm"
    log = (run_dir / f"slurm-{job_id}.out").read_text()
    assert "export TENSORFLEET_TOKEN=s3cret-token" in (run_dir / "submit.sbatch").read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{log}"
    assert "job finished with exit code 0" in log

    # two servers, started as the two tasks of one srun step, each reported its own address
    step_dir = run_dir / f"job-{job_id}"
    servers = slurm.read_hostfile(step_dir / "servers")
    assert len(set(servers)) == 2, servers
    for task in (0, 1):
        server_log = (step_dir / f"server-{task}.log").read_text()
        assert "SERVING on port" in server_log and "stopped" in server_log, server_log
    assert f"servers {servers[0]},{servers[1]}" in log or f"servers {servers[1]},{servers[0]}" in log
    assert not any(_port_open(address) for address in servers), "servers must be stopped with the job"

    # the same spec through `tensorfleet run` with its own local servers
    reference = _write_job(tmp_path, "local", "local-out.h5")
    done = subprocess.run([sys.executable, "-m", "tensorfleet.coordinator", "run", str(reference)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    expected, actual = _datasets(tmp_path / "local-out.h5"), _datasets(tmp_path / "slurm-out.h5")
    assert actual["ok"].all() and len(actual["ids"]) == ROWS
    for name, values in expected.items():
        np.testing.assert_array_equal(actual[name], values, err_msg=name)


def test_a_server_that_cannot_start_fails_the_batch_job_quickly(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    job = _write_job(tmp_path, "broken", "broken-out.h5")
    submitted = subprocess.run(
        [*_tensorfleet_slurm(), str(job), "--cpu", "--gpus", "2", "--model-repository", str(tmp_path / "missing")],
        capture_output=True, text=True, cwd=REPO_ROOT, env=slurm_cluster.env, timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split("submitted batch job ")[1].split()[0]
    state = _wait_for_job(slurm_cluster, job_id, timeout=90)
    log = (tmp_path / "broken.slurm" / f"slurm-{job_id}.out").read_text()
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", f"{state}\n{log}"
    assert "failed to start" in log and "did not become healthy" in log
    assert not (tmp_path / "broken-out.h5").exists()



def _dpam_copy(tmp_path: Path) -> Path:
    root = tmp_path / "dpam"
    shutil.copytree(REPO_ROOT / "examples" / "dpam", root, ignore=shutil.ignore_patterns("output", "*.tfjob"))
    return root


def test_dry_run_of_a_multi_stage_job_serves_every_stage_model(tmp_path: Path) -> None:
    """Issue 13: the DPAM example (two stages) through `slurm --dry-run`; its servers load both models."""
    root = _dpam_copy(tmp_path)
    script = _dry_run(root / "dpam.yaml", "--gpus", "2")
    assert subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30).returncode == 0
    args = build_parser().parse_args(_server_args(script))
    assert args.model_repository == root / "models" and args.models == ["dpam_features", "domass"]
    assert "--model dpam_features --model domass" in script  # the health wait checks both


def test_tensorfleet_slurm_runs_a_multi_stage_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Issue 13: the DPAM example on one srun CPU server that serves both stages' models equals `tensorfleet run`."""
    root, reference = _dpam_copy(tmp_path / "slurm"), _dpam_copy(tmp_path / "local")
    submitted = subprocess.run(
        [*_tensorfleet_slurm(), str(root / "dpam.yaml"), "--cpu", "--gpus", "1", "--startup-timeout", "120"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=slurm_cluster.env, timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split("submitted batch job ")[1].split()[0]
    state = _wait_for_job(slurm_cluster, job_id, timeout=240)
    log = (root / "dpam.slurm" / f"slurm-{job_id}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{log}"
    done = subprocess.run([sys.executable, "-m", "tensorfleet.coordinator", "run", str(reference / "dpam.yaml")],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=240)
    assert done.returncode == 0, done.stderr
    import pyarrow.parquet as pq

    ours, theirs = pq.read_table(root / "output" / "domass.parquet"), pq.read_table(reference / "output" / "domass.parquet")
    assert ours.column("id").to_pylist() == theirs.column("id").to_pylist()
    assert ours.column("probabilities").to_pylist() == theirs.column("probabilities").to_pylist()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def test_serve_task_starts_a_dead_server_again_on_its_port(tmp_path: Path) -> None:
    """A server that dies while serving (a crash on a row, a failed device) is started again on
    the port the hostfile already names, so the coordinator's address stays good."""
    import signal as signals

    from tensorfleet.client import InferenceClient

    hostfile = tmp_path / "servers"
    task = subprocess.Popen(
        [sys.executable, "-m", "tensorfleet.coordinator.fleet.slurm", "serve-task", "--hostfile", str(hostfile),
         "--host", "127.0.0.1", "--", "--model-repository", str(MODELS), "--model", "simple", "--host", "127.0.0.1"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    inputs = {"INPUT0": np.ones((2, 16), np.float32), "INPUT1": np.ones((2, 16), np.float32)}
    try:
        [address] = slurm.wait_healthy(hostfile, 1, timeout=120, model="simple")
        [first] = _children(task.pid)
        os.kill(first, signals.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (_children(task.pid) and _children(task.pid) != [first]):
            time.sleep(0.1)
        [second] = _children(task.pid)
        assert second != first
        slurm.wait_healthy(hostfile, 1, timeout=120, model="simple")  # the same line answers again
        with InferenceClient(address) as client:
            assert np.array_equal(client.infer("simple", inputs)["OUTPUT0"], np.full((2, 16), 2.0, np.float32))
        assert slurm.read_hostfile(hostfile) == [address]
        slurm.stop_file(hostfile).touch()
        assert task.wait(60) == 0
        assert "starting it again on its port" in task.stderr.read()
    finally:
        if task.poll() is None:
            task.kill()
            task.wait(10)


# ------------------------------------------------------------------ sharded: a job array and a merge job (issue 26)


def _slow_job(folder: Path, name: str, rows: int) -> Path:
    """`rows` rows of the slow identity model (50 ms a batch): 40-row chunks of 4-row requests."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "in.h5"
    with h5py.File(data, "w") as handle:
        handle["x"] = np.random.default_rng(26).standard_normal((rows, 2)).astype(np.float32)
    spec = {
        "name": name,
        "input": {"path": "in.h5", "tensors": {"x": "x"}},
        "model": {"name": "slow_identity", "local": {"repository": str(MODELS), "count": 1}},
        "output": {"path": "out.h5"},
        "chunking": {"chunk_rows": 40, "batch_rows": 4},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _split_dry_run(text: str) -> tuple[str, str]:
    array, _, merge = text.partition("# ---- the merge job")
    return array, "#" + merge.split("\n", 1)[1] if merge else ""


def test_dry_run_with_shards_shows_the_array_and_the_merge_job(tmp_path: Path) -> None:
    job = _slow_job(tmp_path, "sharded", 80)
    array, merge = _split_dry_run(_dry_run(job, "--gpus", "2", "--cpu", "--shards", "3", "--partition", "cpu"))
    for script in (array, merge):
        checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr + script
    assert "#SBATCH --array=0-2" in array and "#SBATCH --ntasks=2" in array
    run_line = next(line for line in array.splitlines() if " run " in line and "tensorfleet.coordinator" in line)
    assert '--shard "$SLURM_ARRAY_TASK_ID/3"' in run_line and '--servers "$SERVER_LIST"' in run_line
    assert 'job-${SLURM_ARRAY_JOB_ID:-$$}_${SLURM_ARRAY_TASK_ID:-0}' in array  # each task its own run folder
    assert "#SBATCH --dependency=afterok:<array job id>" in merge and "#SBATCH --kill-on-invalid-dep=yes" in merge
    assert "#SBATCH --ntasks=1" in merge and "#SBATCH --partition=cpu" in merge and "gpus" not in merge
    assert f'JOB={shlex.quote(str(job.resolve()))}' in merge
    assert '"${PYTHON[@]}" -m tensorfleet.coordinator merge "$JOB"' in merge
    assert not (tmp_path / "sharded.slurm").exists(), "--dry-run must write nothing"


def _task_state(cluster: SlurmCluster, job_id: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=cluster.env,
                           capture_output=True, text=True, timeout=30)
    fields = dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)
    return fields.get("JobState", "")


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


def test_a_job_array_of_three_shards_with_one_task_cancelled_and_resubmitted(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """N = 3 CPU shards as a job array; task 1 is cancelled mid-run (scancel of that one task) and
    submitted again on its own; the output equals one coordinator's, bit for bit."""
    from tests.coordinator.helpers import chunks_done

    rows = 1200  # 30 chunks, 10 a shard; ~0.5 s a chunk on the slow model
    job = _slow_job(tmp_path / "sharded", "sharded", rows)
    submitted = subprocess.run(
        [*_tensorfleet_slurm(), str(job), "--cpu", "--gpus", "1", "--shards", "3", "--startup-timeout", "90"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=slurm_cluster.env, timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    array_id = submitted.stdout.split("submitted batch job ")[1].split()[0]
    merge_id = submitted.stdout.split("merge job ")[1].split()[0]
    shard = tmp_path / "sharded" / "out.h5.tfjob" / "shards" / "1-of-3"
    _wait_until(lambda: chunks_done(shard) >= 2, 180, "two committed chunks in shard 1")
    subprocess.run(["scancel", f"{array_id}_1"], env=slurm_cluster.env, check=True, timeout=30)
    for task in (0, 1, 2):
        _wait_for_job(slurm_cluster, f"{array_id}_{task}", timeout=240)
    assert _task_state(slurm_cluster, f"{array_id}_1") == "CANCELLED"
    assert _task_state(slurm_cluster, f"{array_id}_0") == _task_state(slurm_cluster, f"{array_id}_2") == "COMPLETED"
    kept = chunks_done(shard)
    assert 2 <= kept < 10, "the cancel should land mid-shard"
    assert not (tmp_path / "sharded" / "out.h5").exists()
    refused = subprocess.run([sys.executable, "-m", "tensorfleet.coordinator", "merge", str(job)],
                             capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert refused.returncode == 2 and "shard 1/3 (" in refused.stderr, refused.stderr
    # the merge job's dependency can no longer be met: SLURM cancels it
    _wait_until(lambda: _task_state(slurm_cluster, merge_id) in ("CANCELLED", "FAILED", ""), 120,
                "the merge job to be dropped")

    again = subprocess.run(["sbatch", "--parsable", "--array=1", str(tmp_path / "sharded" / "sharded.slurm" /
                                                                      "submit-array.sbatch")],
                           capture_output=True, text=True, env=slurm_cluster.env, timeout=60)
    assert again.returncode == 0, again.stderr
    again_id = again.stdout.strip().split(";")[0]
    state = _wait_for_job(slurm_cluster, f"{again_id}_1", timeout=240)
    log = (tmp_path / "sharded" / "sharded.slurm" / f"slurm-{again_id}_1.out").read_text()
    assert state["JobState"] == "COMPLETED", f"{state}\n{log}"
    computed = int(log.split("speed: ")[1].split()[0])
    assert computed == (10 - kept) * 40, log  # the committed chunks were kept, not computed again
    assert "output: " in log  # the last shard to finish merged

    reference = _slow_job(tmp_path / "one", "one", rows)
    done = subprocess.run([sys.executable, "-m", "tensorfleet.coordinator", "run", str(reference)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=240)
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "one" / "out.h5") as one, h5py.File(tmp_path / "sharded" / "out.h5") as sharded:
        assert list(sharded["ids"][()]) == list(one["ids"][()]) and len(one["ids"]) == rows
        for name in ("ok", "y"):
            assert np.asarray(sharded[name][()]).tobytes() == np.asarray(one[name][()]).tobytes(), name
