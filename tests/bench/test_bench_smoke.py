"""Each benchmark runs at its --quick size and prints one JSON line with its figures.

No timing is asserted (figures depend on the machine); these only prove the benches run end
to end against real servers and report what they promise. Every bench stops its own processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

EXPECTED = {
    "transport": {"cases", "ratio_1mb_1stream", "ratio_1mb_2streams", "shm_ratio_1mb_1stream"},
    "batching": {"offline_rows_per_s", "levels", "ratio_1_clients", "ratio_4_clients", "ratio_4_clients_shared_stream"},
    "scale": {"single_server_rows_per_s", "levels", "busy_2", "throughput_ratio_2", "cpu_s_per_chunk_2"},
    "rest": {"ratio_rest_over_grpc", "grpc_ms_per_request", "rest_ms_per_request"},
    "model_thread": {"ratio", "loader_thread_seq_per_s", "other_thread_seq_per_s"},
    "server_passes": {"variants", "ratio_glibc-default", "threads"},
    "warm_start": {"runs", "first_result_s_median", "first_result_s_min", "cli_help_s"},
    "end_to_end": {
        "inprocess_seq_per_s",
        "tensorfleet_seq_per_s",
        "ratio",
        "ratio_dispatch",
        "max_abs_diff",
    },
}


def run_bench(name: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bench_prints_one_json_line(name: str) -> None:
    record = run_bench(name)
    assert record["bench"] == name
    assert EXPECTED[name] <= set(record), EXPECTED[name] - set(record)
    figures = [
        value
        for key, value in record.items()
        if key.startswith(("ratio", "busy_", "first_result_s"))
    ]
    assert figures and all(isinstance(value, float) and value > 0 for value in figures), record
    if (
        name == "end_to_end"
    ):  # the in-process loop and tensorfleet wrote the same ids and embeddings
        assert record["same_ids"] is True
        assert record["max_abs_diff"] < 1e-4


def test_help_runs() -> None:
    for name in EXPECTED:
        result = subprocess.run(
            [sys.executable, "-m", f"bench.{name}", "--help"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and "--quick" in result.stdout, result.stderr


@pytest.mark.timeout(300)
def test_rest_sequential_rows_cover_both_clients_and_sizes() -> None:
    """`bench.rest --sequential` (issue 30): tritonclient.http vs .grpc and perf_analyzer both ways,
    on `simple` and at 64 B, 4 KB, 1 MB; every reply was checked by the bench itself."""
    result = subprocess.run([sys.executable, "-m", "bench.rest", "--sequential", "--quick"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["bench"] == "rest-sequential"
    assert set(record["tritonclient"]) == {"simple", "64 B", "4 KB", "1 MB"}
    for row in record["tritonclient"].values():
        assert row["http"]["calls"] == row["grpc"]["calls"] > 0
        assert row["ratio_http_over_grpc_median"] > 0
    perf = record["perf_analyzer"]
    assert "skipped" in perf or all(row["ratio_http_over_grpc_p50"] > 0 for row in perf.values()), perf
