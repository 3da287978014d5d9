"""`tensorfleet embed`: a tiny ESM-2 checkpoint folder saved by transformers + a FASTA file, one
command, HDF5 and parquet outputs equal to transformers in-process on every row; killed with
SIGKILL mid-job, `--resume` finishes it without recomputing committed chunks.

Tolerance 1e-5 (fp32, CPU): the servers pad rows together with others, the reference runs each
row alone (tests/services/backends/test_transformers_backend.py holds the bitwise comparison).
"""

from __future__ import annotations

import signal
import sqlite3

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.coordinator.helpers import (
    chunks_done,
    make_fasta,
    run_tensorfleet,
    start_tensorfleet,
    wait_for,
)
from tests.hf_checkpoints import load_reference, reference_embed, save_esm2

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    folder = save_esm2(root / "esm2_tiny", seed=3)
    model, tokenizer = load_reference(folder)
    return root, folder, model, tokenizer


def _alone(model, tokenizer, sequences):
    """Each sequence run alone in this process (no padding)."""
    return {key: np.stack([reference_embed(model, tokenizer, [s])[key][0] for s in sequences])
            for key in ("mean", "cls")}


def test_embed_writes_hdf5_with_mean_cls_and_per_token_equal_to_transformers(checkpoint):
    root, folder, model, tokenizer = checkpoint
    records = make_fasta(root / "proteins.fasta", 40, seed=4)
    out = root / "h5" / "emb.h5"
    done = run_tensorfleet("embed", folder, root / "proteins.fasta", "-o", out, "--gpus", "0", "--pool", "mean,cls",
                           "--per-token", "--threads", "1", "--chunk-rows", "16")
    assert done.returncode == 0, done.stderr
    files = out.with_name("emb.h5.embed")
    assert f"job file {files / 'job.yaml'}" in done.stderr
    job = yaml.safe_load((files / "job.yaml").read_text())
    config = yaml.safe_load((files / "models" / "esm2_tiny" / "config.yaml").read_text())
    assert job["model"]["local"]["repository"] == "models" and config["backend"] == "transformers"
    assert set(config["transformers"]["checksums"]) == {"config.json", "model.safetensors"}
    sequences = [sequence for _, sequence in records]
    want = _alone(model, tokenizer, sequences)
    with h5py.File(out) as f:
        assert [v.decode() for v in f["ids"][:]] == [key for key, _ in records]
        assert f["ok"][:].all()
        np.testing.assert_allclose(f["mean"][:], want["mean"], rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(f["cls"][:], want["cls"], rtol=0, atol=TOLERANCE)
        flat, offsets = f["per_token"][:], f["per_token_offsets"][:]
    for row, sequence in enumerate(sequences):
        states = reference_embed(model, tokenizer, [sequence])["per_token"][0]
        np.testing.assert_allclose(flat[offsets[row]:offsets[row + 1]], states, rtol=0, atol=TOLERANCE)
    # the written job file runs again as an ordinary job: a resume of finished work computes nothing
    again = run_tensorfleet("run", files / "job.yaml", "--resume")
    assert again.returncode == 0, again.stderr
    status = run_tensorfleet("status", out.with_name("emb.h5.tfjob"))
    assert status.returncode == 0 and "done" in status.stdout


def test_embed_to_parquet_and_dry_run(checkpoint):
    root, folder, model, tokenizer = checkpoint
    records = make_fasta(root / "few.fasta", 12, seed=5)
    out = root / "pq" / "emb.parquet"
    plan = run_tensorfleet("embed", folder, root / "few.fasta", "-o", out, "--gpus", "0", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert not out.exists()
    done = run_tensorfleet("embed", folder, root / "few.fasta", "-o", out, "--gpus", "0", "--threads", "1")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == [key for key, _ in records]
    got = np.stack(table.column("mean").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, _alone(model, tokenizer, [s for _, s in records])["mean"], rtol=0, atol=TOLERANCE)


def test_embed_killed_with_sigkill_resumes_without_recomputing_committed_chunks(checkpoint):
    root, folder, model, tokenizer = checkpoint
    records = make_fasta(root / "many.fasta", 1200, seed=6)
    out = root / "killed" / "emb.h5"
    job_dir = out.with_name("emb.h5.tfjob")
    args = ("embed", folder, root / "many.fasta", "-o", out, "--gpus", "0", "--threads", "1", "--chunk-rows", "16")
    first = start_tensorfleet(*args, log=root / "killed.log")
    try:
        wait_for(lambda: chunks_done(job_dir) >= 2 or first.poll() is not None, timeout=240, what="two chunks")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    with sqlite3.connect(job_dir / "manifest.sqlite") as db:
        before = dict(db.execute("SELECT idx, committed_at FROM chunks WHERE done = 1").fetchall())
        total = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    assert 0 < len(before) < total, "the kill should land mid-job"
    resumed = run_tensorfleet(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    with sqlite3.connect(job_dir / "manifest.sqlite") as db:
        after = dict(db.execute("SELECT idx, committed_at FROM chunks WHERE done = 1").fetchall())
    assert len(after) == total
    assert all(after[chunk] == at for chunk, at in before.items()), "a committed chunk was computed again"
    picked = [0, 17, 599, 1199]
    with h5py.File(out) as f:
        ids = [v.decode() for v in f["ids"][:]]
        mean = f["mean"][:]
    assert ids == [key for key, _ in records]
    want = _alone(model, tokenizer, [records[i][1] for i in picked])["mean"]
    np.testing.assert_allclose(mean[picked], want, rtol=0, atol=TOLERANCE)


def test_embed_names_what_is_wrong(checkpoint, tmp_path):
    root, folder, _, _ = checkpoint
    (tmp_path / "in.fasta").write_text(">a\nMKT\n")
    not_hf = tmp_path / "plain"
    not_hf.mkdir()
    bad = run_tensorfleet("embed", not_hf, tmp_path / "in.fasta", "-o", tmp_path / "o.h5")
    assert bad.returncode == 2 and "holds no config.json" in bad.stderr
    bad = run_tensorfleet("embed", folder, tmp_path / "in.fasta", "-o", tmp_path / "o.h5", "--pool", "max")
    assert bad.returncode == 2 and "--pool max: choose from mean, cls, last" in bad.stderr
    bad = run_tensorfleet("embed", "lab/never-downloaded", tmp_path / "in.fasta", "-o", tmp_path / "o.h5",
                          env={"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    assert bad.returncode == 2 and "not in the local Hugging Face cache" in bad.stderr


def test_embed_files_through_submit_wait_to_a_coordinator_service(checkpoint, tmp_path):
    """The operator keeps the written model repository under --model-root; the job file goes to
    `tensorfleet submit --wait` unchanged and its output equals transformers in-process."""
    from tests.security.helpers import spawned

    root, folder, model, tokenizer = checkpoint
    for name in ("data", "out"):
        (tmp_path / name).mkdir()
    records = make_fasta(tmp_path / "data" / "in.fasta", 10, seed=8)
    out = tmp_path / "out" / "emb.h5"
    files = tmp_path / "embed-files"
    written = run_tensorfleet("embed", folder, tmp_path / "data" / "in.fasta", "-o", out, "--gpus", "0",
                              "--threads", "1", "--files-dir", files, "--write-only")
    assert written.returncode == 0, written.stderr
    assert written.stdout.strip() == str(files / "job.yaml") and not out.exists()
    args = ["coordinator", "serve", "--state-dir", tmp_path / "state", "--data-root", tmp_path / "data",
            "--output-root", tmp_path / "out", "--model-root", files / "models"]
    with spawned(args, tmp_path / "coordinator") as service:
        done = run_tensorfleet("submit", files / "job.yaml", "--wait", "--coordinator", service.address)
    assert done.returncode == 0, done.stderr + done.stdout
    with h5py.File(out) as f:
        assert [v.decode() for v in f["ids"][:]] == [key for key, _ in records]
        np.testing.assert_allclose(f["mean"][:], _alone(model, tokenizer, [s for _, s in records])["mean"],
                                   rtol=0, atol=TOLERANCE)


def test_embed_applies_the_over_length_policy_of_the_job(checkpoint, tmp_path):
    """ESM's tokenizer is one token per residue, so embed declares max_length in residues (the
    token limit less <cls>/<eos>) and the job's over_length decides: error fails that row alone."""
    _, folder, model, tokenizer = checkpoint
    (tmp_path / "in.fasta").write_text(">short\nMKTAYIAK\n>long\n" + "M" * 30 + "\n>also\nACDEF\n")
    out = tmp_path / "o.h5"
    done = run_tensorfleet("embed", folder, tmp_path / "in.fasta", "-o", out, "--gpus", "0", "--threads", "1",
                           "--max-length", "12", "--over-length", "error")
    assert done.returncode == 1, done.stderr  # some rows failed: the long one
    with h5py.File(out) as f:
        ok, mean = f["ok"][:], f["mean"][:]
        message = f["errors"]["message"][0].decode()
    assert ok.tolist() == [True, False, True] and "at most 10 (input.over_length: error)" in message
    want = _alone(model, tokenizer, ["MKTAYIAK", "ACDEF"])["mean"]
    np.testing.assert_allclose(mean[[0, 2]], want, rtol=0, atol=TOLERANCE)
