"""The dry run says how the rows are cut as the plan cuts them (issue 29): chunks keep whole
requests, so a 300-row stage of 64-row requests under chunk_rows 40 has 64-row chunks, and the
text must not say "about 40 rows each"."""

from __future__ import annotations

import re
import shutil

import yaml

from tensorfleet.coordinator.engine.planner import Chunk, chunk_sizes

from .helpers import REPO_ROOT, local_model, make_fasta, run_tensorfleet


def chunks(*sizes: int) -> list[Chunk]:
    out, start = [], 0
    for index, size in enumerate(sizes):
        out.append(Chunk(index, start, start + size, (start, start + size)))
        start += size
    return out


def test_chunk_text_is_what_the_plan_holds():
    assert chunk_sizes(chunks(64, 64, 64), 64) == "3 (64 rows each; one part file each)"
    assert chunk_sizes(chunks(128, 128, 44), 64) == (
        "3 (128 rows each, the last 44; chunk_rows 64 rounded up to whole requests; one part file each)")
    assert chunk_sizes(chunks(300), 1024) == "1 (300 rows; one part file each)"
    assert chunk_sizes(chunks(30, 50, 40, 10), 40) == (
        "4 (10 to 50 rows, 32 on average; chunk_rows 40 rounded up to whole requests; one part file each)")


def test_a_300_row_multi_stage_dry_run_gives_each_stage_its_own_chunks(tmp_path):
    make_fasta(tmp_path / "in.fasta", 300)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "name": "two-stages", "input": {"path": "in.fasta"}, "output": {"path": "out.parquet"},
        "stages": [
            {"name": "embed", "model": local_model("embed"), "batch_rows": 16},
            {"name": "head", "model": local_model("head16"), "batch_rows": 64, "tensors": {"x": "embedding"}},
        ],
        "chunking": {"chunk_rows": 40},
    }))
    plan = run_tensorfleet("run", tmp_path / "job.yaml", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    lines = [line.strip() for line in plan.stdout.splitlines() if line.strip().startswith("chunks:")]
    assert lines == [  # 16-row requests, grouped to >= 40 rows: 48; 64-row requests: 64
        "chunks: 7 (48 rows each, the last 12; chunk_rows 40 rounded up to whole requests; one part file each)",
        "chunks: 5 (64 rows each, the last 44; chunk_rows 40 rounded up to whole requests; one part file each)",
    ], plan.stdout
    assert "about" not in plan.stdout


def test_the_in_context_dry_run_says_how_each_run_is_cut(tmp_path):
    shutil.copytree(REPO_ROOT / "examples" / "stack", tmp_path / "stack",
                    ignore=shutil.ignore_patterns("output", "*.tfjob", "__pycache__"))
    plan = run_tensorfleet("run", tmp_path / "stack" / "stack.yaml", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    found = re.findall(r"chunks: .*", plan.stdout)
    assert found == ["chunks: 4 (128 rows each, the last 16; one part file each)"] * 2, plan.stdout
