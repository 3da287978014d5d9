"""bench.chaos --quick (make test's smoke): three job kinds under a few seeded faults, every
output bitwise equal to the fault-free run made in the same bench run, no row lost.
bench.soak --quick (slow): one server under 256 callers for 30 s, no unexpected error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_bench(*args: str, timeout: float) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


@pytest.mark.timeout(400)
def test_chaos_quick_outputs_are_identical_and_nothing_is_lost() -> None:
    record = run_bench("bench.chaos", "--quick", timeout=380)
    assert record["bench"] == "chaos"
    assert record["runs"] == 3 and record["runs_finished"] == 3, record
    assert record["outputs_identical"] == 3, record
    assert record["rows_lost"] == 0, record
    assert record["faults_total"] >= 3 and record["faults"].get("coordinator_kill", 0) >= 1, record
    assert not record["problems"], record["problems"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_quick_has_no_unexpected_error() -> None:
    record = run_bench("bench.soak", "--quick", timeout=280)
    assert record["server_alive"] and record["requests_total"] > 0, record
    assert record["unexpected_errors"] == 0, record["unexpected_examples"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_service_quick_keeps_jobs_consistent_and_kills_no_server_late() -> None:
    record = run_bench("bench.soak_service", "--quick", timeout=580)
    assert record["jobs_submitted"] > 0 and record["service_kills"] == 1, record
    assert record["inconsistent_jobs"] == 0, record["problems"]
    assert record["servers_outliving_their_job"] == 0, record["problems"]
    assert record["state_job_folders_max"] <= record["keep_finished"] + 10, record
