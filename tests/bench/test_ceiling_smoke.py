"""bench.dispatch_ceiling and bench.scale --light at their --quick sizes: one JSON line each,
with the figures they promise. No timing is asserted; the figures depend on the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_quick(*args: str, timeout: float) -> dict:
    result = subprocess.run([sys.executable, "-m", *args, "--quick"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


@pytest.mark.timeout(660)
def test_dispatch_ceiling_quick():
    record = run_quick("bench.dispatch_ceiling", timeout=600)
    assert record["bench"] == "dispatch_ceiling"
    for kind in ("f16", "f320", "bytes"):
        figures = record[f"dispatch_{kind}"]
        assert figures["rows"] == 10_000 and figures["chunks"] == 3
        assert figures["rows_per_s"] > 0 and figures["coordinator_cpu_us_per_row"] > 0
    assert [level["rows"] for level in record["phases"]] == [1000, 10_000, 100_000]
    for phase in ("plan", "dispatch", "merge", "resume"):
        assert f"{phase}_cpu_per_row_ratio" in record and f"{phase}_cpu_us_per_row_100000" in record, phase
    assert record["peak_rss_mb_largest"] > 0
    assert record["peak_rss_mb_100000"]["run"] > 0


@pytest.mark.timeout(400)
def test_scale_light_quick():
    record = run_quick("bench.scale", "--light", timeout=360)
    assert record["bench"] == "scale" and record["servers_kind"].startswith("simulated")
    level = record["levels"][0]
    assert level["servers"] == 16 and level["rows"] == 16 * 512
    assert 0 < record["busy_16"] <= 1.0
