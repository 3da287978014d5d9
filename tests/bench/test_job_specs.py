"""The hostile-spec base job that tests/security and bench/probe share (bench/job_specs.py)."""

from __future__ import annotations

from pathlib import Path

from bench.job_specs import minimal_job, with_changes


def test_changes_set_nested_keys_make_parents_and_none_removes():
    base = {"model": {"name": "embed", "servers": ["a"]}, "output": {"path": "o.h5"}}
    changed = with_changes(base, {"model__servers": None, "model__local__repository": "/r", "output": {"path": "x"}})
    assert changed == {"model": {"name": "embed", "local": {"repository": "/r"}}, "output": {"path": "x"}}
    assert base == {"model": {"name": "embed", "servers": ["a"]}, "output": {"path": "o.h5"}}  # not mutated


def test_the_minimal_job_reads_root_data_and_writes_root_out(tmp_path: Path):
    job = minimal_job(tmp_path, "attack", "127.0.0.1:1", "result.h5", chunking__batch_rows=4, name="other")
    assert job == {
        "name": "other",  # a change may name any field, `name` too
        "input": {"path": str(tmp_path / "data" / "in.fasta")},
        "model": {"name": "embed", "servers": ["127.0.0.1:1"]},
        "output": {"path": str(tmp_path / "out" / "result.h5")},
        "chunking": {"batch_rows": 4},
    }
