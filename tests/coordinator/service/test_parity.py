"""The service reports every job kind as it is (issue 27 item 7): plain, multi-stage, models x
sources and in-context jobs show rows done, rows/s and servers up while they run (seen through
the dashboard in a real headless Chromium, and over gRPC); a cancelled sweep counts the rows its
manifests committed out of all its parts' rows; a killed engine is "stopped", never "starting"
forever; `tensorfleet retry JOB_ID` computes a job's failed rows again.

Real model servers and a real `coordinator serve` on loopback. A job is held running mid-way by
the test models' wait file (parity_jobs.py), so nothing here depends on timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tensorfleet.client.coordinator_client import job_state
from tests.coordinator.helpers import MODELS, run_tensorfleet, wait_for
from tests.serving import running_server

from .helpers import pid_gone, running_coordinator, start_coordinator
from .parity_jobs import (
    PROMPTED,
    committed,
    committed_total,
    fasta,
    incontext_job,
    pipeline_job,
    plain_job,
    sweep_job,
    wait_env,
    write,
)
from .test_dashboard import CHROMIUM, chromium


def run_dirs(job_dir: str) -> list[Path]:
    """A job's run folders, from its own files: the folder, or its workflow's parts."""
    folder = Path(job_dir)
    marker = folder / "workflow.json"
    if not marker.is_file():
        return [folder]
    return [folder / part["dir"] for part in json.loads(marker.read_text())["parts"]]


class JobTable(HTMLParser):
    """The rendered dashboard: each job row's cells, and the parts table's rows."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.jobs: dict[str, list[str]] = {}
        self.parts: list[list[str]] = []
        self._row: list[str] | None = None
        self._table = ""
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "table":
            self._table = attributes.get("id") or ""
        elif tag == "tr" and self._table in ("jobs", "parts"):
            self._row = []
            if self._table == "jobs" and attributes.get("data-job-id"):
                self.jobs[attributes["data-job-id"] or ""] = self._row
            elif self._table == "parts":
                self.parts.append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append(" ".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            if self._table == "parts" and self.parts and not self.parts[-1]:
                self.parts.pop()  # the header row: <th> cells only
            self._row = None
        elif tag == "table":
            self._table = ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None and data.strip():
            self._cell.append(data.strip())


JOB_COLUMNS = ["job", "name", "state", "progress", "rows", "failed", "rows/s", "servers up", "submitted"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make browser installs it as root)")
def test_every_job_kind_shows_its_progress_rate_and_servers_in_the_dashboard(tmp_path) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    hold = tmp_path / "hold"
    hold.touch()
    env = wait_env(hold)
    port_file = tmp_path / "http-port"
    with running_server(MODELS, env=env) as plain_server, running_server(MODELS, env=env) as sweep_server, \
            running_server(MODELS, env=env) as pipeline_server, running_server(PROMPTED, env=env) as context_server, \
            running_coordinator(tmp_path / "state", "--max-jobs", "4", "--http-port", "0",
                                "--http-port-file", str(port_file)) as coordinator, \
            coordinator.client() as client:
        try:
            files = {
                "plain": plain_job(folder, plain_server.address),
                "models x sources": sweep_job(folder, sweep_server.address, context_server.address),
                "in-context": incontext_job(folder, context_server.address),
                "multi-stage": pipeline_job(folder, pipeline_server.address),  # last: the page shows its parts
            }
            ids = {kind: client.submit(path).job_id for kind, path in files.items()}

            def running_with_a_rate() -> bool:
                jobs = [client.get(job_id) for job_id in ids.values()]
                return all(job_state(j) == "RUNNING" and j.rows_per_second > 0 and j.servers for j in jobs)

            wait_for(running_with_a_rate, timeout=240, what="every kind running with rows/s and its servers")
            held = {kind: client.get(job_id) for kind, job_id in ids.items()}
            for kind, job in held.items():
                assert 0 < job.rows_done < job.rows, (kind, job.rows_done, job.rows)
                assert [s.alive for s in job.servers] == [True], (kind, job.servers)
                assert job.rows_done <= committed_total(run_dirs(job.job_dir)), kind
            sweep = held["models x sources"]
            assert sweep.rows == 2 * (32 + 96)  # the second model's parts, not planned yet, counted
            assert [p.estimated for p in sweep.parts] == [False, False, True, True], sweep.parts
            assert [p.label for p in held["multi-stage"].parts] == ["stage 1 embed", "stage 2 head"]
            listed = run_tensorfleet("jobs", "--coordinator", coordinator.address)
            assert listed.returncode == 0, listed.stderr
            for job in held.values():
                line = next(line for line in listed.stdout.splitlines() if line.startswith(job.job_id))
                assert "rows/s" in line and "1/1 servers up" in line, line

            base = f"http://127.0.0.1:{port_file.read_text().strip()}/"
            running = JobTable(chromium(base, "--dump-dom").stdout.decode())
        finally:
            hold.unlink(missing_ok=True)
        finals = {kind: client.wait(job_id) for kind, job_id in ids.items()}
        finished = JobTable(chromium(base, "--dump-dom").stdout.decode())

    for kind, job_id in ids.items():
        cells = dict(zip(JOB_COLUMNS, running.jobs[job_id], strict=True))
        assert cells["state"] == "RUNNING", (kind, cells)
        done, total = (int(n) for n in cells["rows"].split("/"))
        assert 0 < done < total, (kind, cells)
        assert float(cells["rows/s"]) > 0 and cells["servers up"] == "1/1", (kind, cells)
        final = finals[kind]
        assert job_state(final) == "SUCCEEDED" and final.rows_failed == 0, (kind, final.error)
        assert final.rows_done == final.rows == committed_total(run_dirs(final.job_dir)), kind
        end = dict(zip(JOB_COLUMNS, finished.jobs[job_id], strict=True))
        assert end["state"] == "SUCCEEDED" and end["rows"] == f"{final.rows}/{final.rows}", (kind, end)
    # the selected job (the latest: the pipeline) lists its stages, each with its own counts
    assert [row[0] for row in running.parts] == ["stage 1 embed", "stage 2 head"], running.parts
    assert [row[0] for row in finished.parts] == ["stage 1 embed", "stage 2 head"], finished.parts
    assert all(row[3] == "96/96" for row in finished.parts), finished.parts


def test_a_cancelled_sweep_counts_the_rows_its_manifests_committed(tmp_path) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    with running_server(MODELS, env=wait_env(hold)) as server, running_server(PROMPTED) as other, \
            running_coordinator(tmp_path / "state") as coordinator, coordinator.client() as client:
        try:
            job = client.submit(sweep_job(tmp_path, server.address, other.address))
            second = tmp_path / "sheets" / ".sweep.tfjob" / "embed" / "second"
            wait_for(lambda: committed(second)[0] > 0, timeout=180, what="the second source's first chunks")
            cancelled = run_tensorfleet("cancel", job.job_id, "--coordinator", coordinator.address)
            assert cancelled.returncode == 0, cancelled.stderr
            final = client.wait(job.job_id)
        finally:
            hold.unlink(missing_ok=True)
        listed = run_tensorfleet("jobs", "--coordinator", coordinator.address)
    assert job_state(final) == "CANCELLED", final.error
    rows_committed = committed_total(run_dirs(final.job_dir))
    assert 32 < rows_committed < 32 + 96  # the first source, and part of the second
    assert final.rows_done == rows_committed
    assert final.rows == 2 * (32 + 96)  # every part's rows, the second model's not planned yet
    assert f"{rows_committed}/{final.rows} rows" in final.error, final.error
    assert f"{rows_committed}/{final.rows} rows" in listed.stdout, listed.stdout
    assert "(not planned yet)" in listed.stdout


def test_a_killed_engine_is_stopped_and_a_restarted_service_leaves_nothing_running(tmp_path) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    fasta(folder / "in.fasta", 40)
    # servers that never answer: the engine stays "starting" until it is killed
    spec = write(folder / "stuck.yaml", {
        "name": "stuck", "input": {"path": "in.fasta"}, "output": {"path": "stuck.parquet"},
        "model": {"name": "embed", "servers": ["127.0.0.1:9"]}, "policy": {"server_wait_s": 600},
    })
    with running_coordinator(tmp_path / "state") as coordinator, coordinator.client() as client:
        job = client.submit(spec)
        status_file = folder / "stuck.parquet.tfjob" / "status.json"
        wait_for(lambda: status_file.is_file() and json.loads(status_file.read_text())["state"] == "starting",
                 timeout=120, what="the engine starting")
        engine = coordinator.engine_pid(job.job_id)
        assert engine
        os.kill(engine, signal.SIGKILL)
        final = client.wait(job.job_id)
        listed = run_tensorfleet("jobs", "--coordinator", coordinator.address)
    assert job_state(final) == "FAILED" and final.engine_state == "stopped", (final.engine_state, final.error)
    assert final.error.startswith("stopped: the job process was killed by signal SIGKILL"), final.error
    assert f"resume with `tensorfleet resume {job.job_id}`" in final.error
    assert "(stopped)" in listed.stdout, listed.stdout
    local = run_tensorfleet("status", folder / "stuck.parquet.tfjob", "--json")  # read without the service too
    assert json.loads(local.stdout)["state"] == "stopped", local.stdout

    # The service itself killed with a job running, and a cancel requested for a second one.
    hold = tmp_path / "hold"
    hold.touch()
    engines: list[int | None] = []
    # one server each: a held batch holds its whole server
    with running_server(MODELS, env=wait_env(hold)) as server, running_server(MODELS, env=wait_env(hold)) as other, \
            running_server(PROMPTED) as lengths:
        coordinator = start_coordinator(tmp_path / "state", "--max-jobs", "2")
        try:
            with coordinator.client() as client:
                resumed = client.submit(plain_job(folder, server.address)).job_id
                cancelled = client.submit(sweep_job(folder, other.address, lengths.address)).job_id
                wait_for(lambda: all(client.get(j).rows_done > 0 for j in (resumed, cancelled)), timeout=180,
                         what="both jobs under way")
                engines = [coordinator.engine_pid(j) for j in (resumed, cancelled)]
                # the cancel is requested and recorded; the service dies before the engine has stopped
                os.kill(engines[1], signal.SIGSTOP)
                client.cancel(cancelled)
            coordinator.stop(signal.SIGKILL)
            os.kill(engines[1], signal.SIGCONT)
            wait_for(lambda: all(pid_gone(pid) for pid in engines), timeout=60, what="the engines ending with the service")
            hold.unlink()
            with running_coordinator(tmp_path / "state") as restarted, restarted.client() as client:
                assert job_state(client.get(cancelled)) == "CANCELLED", client.get(cancelled).error
                after = client.wait(resumed)
                events = [e.message for e in client.watch(resumed)]
        finally:
            hold.unlink(missing_ok=True)
            coordinator.stop(signal.SIGKILL)
            for pid in engines:  # never leave a stopped engine behind a failed assertion
                if pid and not pid_gone(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                        os.kill(pid, signal.SIGKILL)
    assert job_state(after) == "SUCCEEDED" and after.rows_done == after.rows == 96, after.error
    assert after.attempts == 2 and any("the coordinator restarted" in e for e in events), events


def test_retry_computes_the_failed_rows_again_through_the_service(tmp_path) -> None:
    broken = tmp_path / "model-broken"
    broken.touch()
    fasta(tmp_path / "in.fasta", 64, seed=9, marked={5, 40}, marker="FAILS")
    spec = write(tmp_path / "job.yaml", {
        "name": "flaky", "input": {"path": "in.fasta"}, "output": {"path": "out.parquet"},
        "chunking": {"chunk_rows": 16, "batch_rows": 8},
    })
    env = {"TF_TEST_FAIL_ON": "FAILS", "TF_TEST_FAIL_FILE": str(broken)}
    with running_server(MODELS, env=env) as server, running_coordinator(tmp_path / "state") as coordinator:
        text = spec.read_text() + f"model: {{name: embed, servers: ['{server.address}']}}\n"
        spec.write_text(text)
        address = ["--coordinator", coordinator.address]
        first = run_tensorfleet("submit", spec, "--wait", *address)
        assert first.returncode == 1, first.stdout + first.stderr  # some rows failed
        job_id = first.stdout.split()[1]
        with coordinator.client() as client:
            failed = client.get(job_id)
        assert job_state(failed) == "SUCCEEDED" and failed.exit_code == 1 and failed.rows_failed > 0
        before = pq.read_table(tmp_path / "out.parquet").column("ok").to_pylist()
        assert before.count(False) == failed.rows_failed

        broken.unlink()  # the "model" is fixed
        retried = run_tensorfleet("retry", job_id, *address)
        assert retried.returncode == 0, retried.stderr
        watched = run_tensorfleet("watch", job_id, *address)
        assert watched.returncode == 0, watched.stdout + watched.stderr
        assert "retry its" in watched.stdout and "retrying failed rows" in watched.stdout, watched.stdout
        again = run_tensorfleet("retry", job_id, *address)  # nothing left to retry
        with coordinator.client() as client:
            done = client.get(job_id)
    assert job_state(done) == "SUCCEEDED" and done.exit_code == 0 and done.rows_failed == 0, done.error
    assert done.rows_done == done.rows == 64
    assert pq.read_table(tmp_path / "out.parquet").column("ok").to_pylist() == [True] * 64
    assert again.returncode == 2 and "no failed rows to retry" in again.stderr, again.stderr
