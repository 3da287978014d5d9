"""The ESM-2 example's over-length handling (issue 27.5): the model folder `examples/esm2/build.py`
writes declares `max_length` on its `sequence` input, so the example job's `input.over_length`
applies: `truncate` keeps the first max_length residues and marks the row in a `truncated`
dataset (no longer a silent ok=True), `error` fails that row alone before it is sent.

Runs the example job file itself (`examples/esm2/esm2.yaml`), pointed at a tiny fixed-seed
model and a FASTA file made here, on one CPU server.
"""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest
import yaml

from .helpers import REPO_ROOT, run_tensorfleet, write_yaml

sys.path.insert(0, str(REPO_ROOT))
from examples.esm2 import build  # noqa: E402

MAX_LENGTH = 20
LONG = "long_one"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("esm2-over")
    build.main(["--shape", "8M", "--layers", "1", "--dim", "16", "--heads", "2", "--seed", "3",
                "--out", str(root / "models"), "--max-length", str(MAX_LENGTH), "--token-budget", "256",
                "--max-batch-size", "8"])
    records = [("a", "MKTAYIAKQR"), (LONG, "M" + "KV" * 20), ("c", "MSEQ")]
    (root / "in.fasta").write_text("".join(f">{key}\n{seq}\n" for key, seq in records))
    spec = yaml.safe_load((REPO_ROOT / "examples" / "esm2" / "esm2.yaml").read_text())
    spec["input"]["path"] = str(root / "in.fasta")
    spec["model"]["local"].update({"repository": str(root / "models"), "count": 1, "device": "cpu",
                                   "args": ["--threads", "1"]})
    spec["chunking"] = {"chunk_rows": 4, "token_budget": 128}
    return root, records, spec


def run(root, spec, policy: str):
    job = dict(spec, input={**spec["input"], "over_length": policy}, output={**spec["output"], "path": f"out/{policy}.h5"})
    return run_tensorfleet("run", write_yaml(root / f"{policy}.yaml", job))


def test_the_built_model_declares_max_length_on_its_input(example):
    root = example[0]
    config = yaml.safe_load((root / "models" / "esm2" / "config.yaml").read_text())
    assert config["inputs"][0]["name"] == "sequence" and config["inputs"][0]["max_length"] == MAX_LENGTH


def test_truncate_marks_the_cut_row_and_keeps_max_length_residues(example):
    root, records, spec = example
    assert spec["input"]["over_length"] == "truncate"  # what the example job asks
    done = run(root, spec, "truncate")
    assert done.returncode == 0, done.stderr
    assert "truncated: 1 rows longer than the model's max_length 20" in done.stdout + done.stderr
    with h5py.File(root / "out" / "truncate.h5") as f:
        truncated, ok, offsets = f["truncated"][:], f["ok"][:], f["per_residue_offsets"][:]
    long_row = [key for key, _ in records].index(LONG)
    assert truncated.tolist() == [key == LONG for key, _ in records] and ok.all()
    lengths = np.diff(offsets).tolist()
    assert lengths == [min(len(seq), MAX_LENGTH) for _, seq in records] and lengths[long_row] == MAX_LENGTH


def test_error_fails_the_long_row_alone_unsent(example):
    root, records, spec = example
    done = run(root, spec, "error")
    assert done.returncode == 1, done.stderr
    with h5py.File(root / "out" / "error.h5") as f:
        ok = f["ok"][:]
        message = f["errors"]["message"][0].decode()
        assert "truncated" not in f
    assert ok.tolist() == [key != LONG for key, _ in records]
    assert f"is 41 long; the model takes at most {MAX_LENGTH} (input.over_length: error)" in message
