"""The merge's promise that the output's rows are the input's ids, in order: a part file whose
ids differ from the plan's (the file itself sound, its checksum the one the manifest recorded:
what a dispatch bug would leave) fails the merge, and no output is written. The .h5ad output
copies the input's obs names and compares them as bytes; every format checks the ids digest."""

from __future__ import annotations

import sqlite3

import anndata
import h5py
import numpy as np
import pytest

from tensorfleet.coordinator.io.parts import Part, write_part

from .h5ad_files import expression, write_current
from .helpers import MODELS, run_tensorfleet, write_job

MODEL_GENES = (MODELS / "genes" / "genes.txt").read_text().split()


def _finished_job(tmp_path, servers, output: str):
    write_current(tmp_path / "cells.h5ad", expression(45, MODEL_GENES, seed=3), MODEL_GENES, "csr")
    job = write_job(
        tmp_path / "job.yaml", input={"path": "cells.h5ad"},
        model={"name": "genes", "servers": [s.address for s in servers]}, output={"path": output},
        chunking={"chunk_rows": 16, "batch_rows": 8},
    )
    done = run_tensorfleet("run", job, "--job-dir", str(tmp_path / "job"))
    assert done.returncode == 0, done.stderr
    return job, tmp_path / "job"


def _rewrite_ids(job_dir, chunk: int, change) -> None:
    """Part `chunk` written again with `change(ids)` as its ids, and its new checksum recorded."""
    path = job_dir / "parts" / f"chunk-{chunk:07d}.part"
    with Part(path) as part:
        arrays = {name: np.array(part.array(name)) for name in part.names}
        ids = part.strings("ids")
    checksum = write_part(path, arrays, {"ids": change(ids.copy())})
    db = sqlite3.connect(job_dir / "manifest.sqlite")
    try:
        with db:
            db.execute("UPDATE chunks SET checksum = ? WHERE idx = ?", (checksum, chunk))
    finally:
        db.close()


def _swap_two(ids: np.ndarray) -> np.ndarray:
    ids[[0, 1]] = ids[[1, 0]]
    return ids


def _rename_one(ids: np.ndarray) -> np.ndarray:
    ids[3] = "not-a-cell"
    return ids


@pytest.mark.parametrize("output", ["out.h5ad", "out.h5"])
@pytest.mark.parametrize("change", [_swap_two, _rename_one], ids=["swapped", "renamed"])
def test_a_part_whose_ids_differ_fails_the_merge_and_writes_nothing(tmp_path, servers, output, change):
    job, job_dir = _finished_job(tmp_path, servers, output)
    (tmp_path / output).unlink()
    _rewrite_ids(job_dir, 1, change)
    merged = run_tensorfleet("run", job, "--job-dir", str(job_dir), "--resume")
    assert merged.returncode != 0
    assert "merge failed" in merged.stderr and "ids" in merged.stderr, merged.stderr
    assert not (tmp_path / output).exists()
    assert not list(tmp_path.glob(".out.partial*"))


def test_the_same_parts_untouched_merge_again(tmp_path, servers):
    """The control: rewriting a part with its own ids changes nothing, and the merge succeeds."""
    job, job_dir = _finished_job(tmp_path, servers, "out.h5ad")
    (tmp_path / "out.h5ad").rename(tmp_path / "first.h5ad")
    _rewrite_ids(job_dir, 1, lambda ids: ids)
    merged = run_tensorfleet("run", job, "--job-dir", str(job_dir), "--resume")
    assert merged.returncode == 0, merged.stderr
    with h5py.File(tmp_path / "first.h5ad", "r") as first, h5py.File(tmp_path / "out.h5ad", "r") as again:
        assert list(again["obs"]["_index"][:]) == list(first["obs"]["_index"][:])
        assert again["obsm"]["embedding"][:].tobytes() == first["obsm"]["embedding"][:].tobytes()
        assert again["obs"]["tensorfleet_ok"][:].all()
    read = anndata.read_h5ad(tmp_path / "out.h5ad")  # "" is tensorfleet_error's fill value: anndata reads it
    assert read.obs["tensorfleet_error"].tolist() == [""] * 45
