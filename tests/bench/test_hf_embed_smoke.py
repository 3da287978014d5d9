"""`python -m bench.hf_embed --tiny` runs end to end (examples/esm2 built both ways, one real
server, the same model in-process) and prints one JSON line with its ratio. No timing is asserted: the
figure depends on the machine; the embeddings must agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the hf extra (pip install 'tensorfleet[hf]')")

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(400)
def test_hf_embed_tiny_prints_served_over_in_process():
    result = subprocess.run([sys.executable, "-m", "bench.hf_embed", "--tiny", "--threads", "1"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=390)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    record = json.loads(lines[0])
    assert record["bench"] == "hf_embed" and record["rows"] == 48
    assert isinstance(record["ratio_served_over_in_process"], float) and record["ratio_served_over_in_process"] > 0
    assert record["max_abs_diff_served_vs_in_process"] < 1e-5, record
    assert isinstance(record["ratio_transformers_over_handwritten"], float)
    assert record["max_abs_diff_transformers_vs_handwritten"] < 1e-5, record
