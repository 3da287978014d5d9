"""Issue 27.5: errors the merge used to meet after every row was computed (or never) are found by
the plan, exit 2, before any server starts, naming the fix; a model that will not load ends the
job with the server's own error and keeps the job folder and its logs; `tensorfleet status`
takes the job file or the output as well as the job folder.

Every case is a real `tensorfleet run` (or `--dry-run`) on real files; "before any server
starts" is shown by what the job left behind: no job folder, no server log.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.serving import running_server

from .h5ad_files import expression, write_current
from .helpers import MODELS, local_model, run_tensorfleet, write_job

#: The `genes` test model's feature list (tests/coordinator/models/genes/genes.txt).
MODEL_GENES = (MODELS / "genes" / "genes.txt").read_text().split()

RAGGED_CONFIG = """\
name: per_row
backend: python
max_batch_size: 16
inputs:
  - {name: x, datatype: FP32, shape: [2]}
outputs:
  - {name: states, datatype: FP32, shape: [-1, 3], ragged: true}
  - {name: length, datatype: INT32, shape: []}
batching: {max_queue_delay_ms: 1}
"""
RAGGED_MODEL = """\
import numpy as np


class Model:
    \"\"\"Row i holds int(x[i, 0]) states of value x[i, 1]: rows of different lengths.\"\"\"

    def load(self, context):
        pass

    def predict(self, inputs):
        x = inputs["x"]
        lengths = np.clip(x[:, 0], 0, 5).astype(np.int32)
        states = np.zeros((len(x), int(lengths.max(initial=0)), 3), np.float32)
        for row, count in enumerate(lengths):
            states[row, :count] = x[row, 1]
        return {"states": states, "length": lengths}
"""
BROKEN_CONFIG = """\
name: broken
backend: python
max_batch_size: 8
inputs:
  - {name: x, datatype: FP32, shape: [2]}
outputs:
  - {name: y, datatype: FP32, shape: [2]}
"""
BROKEN_MODEL = """\
class Model:
    def load(self, context):
        raise RuntimeError("checkpoint shards disagree: found 3 of 4 (model-00004.safetensors is missing)")

    def predict(self, inputs):
        return {"y": inputs["x"]}
"""


def model_folder(repository: Path, name: str, config: str, code: str) -> None:
    folder = repository / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config)
    (folder / "model.py").write_text(textwrap.dedent(code))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A repository with a ragged model and one whose load raises, an .npy input, and one finished
    ragged job (HDF5 with output.ragged: the check lets a right job through)."""
    root = tmp_path_factory.mktemp("errors")
    model_folder(root / "repo", "per_row", RAGGED_CONFIG, RAGGED_MODEL)
    model_folder(root / "repo", "broken", BROKEN_CONFIG, BROKEN_MODEL)
    x = np.stack([np.arange(12) % 6, np.arange(12) * 0.5], axis=1).astype(np.float32)
    np.save(root / "x.npy", x)
    job = write_job(root / "ragged.yaml", input={"path": "x.npy", "tensors": {"x": "array"}},
                    model={"name": "per_row", "local": {"repository": "repo", "count": 1}},
                    output={"path": "out/ragged.h5", "ragged": {"states": "length"}}, chunking={"chunk_rows": 5})
    done = run_tensorfleet("run", job)
    assert done.returncode == 0, done.stderr
    return root, x


def ragged_job(root: Path, name: str, output: dict) -> Path:
    return write_job(root / f"{name}.yaml", input={"path": "x.npy", "tensors": {"x": "array"}},
                     model={"name": "per_row", "local": {"repository": "repo", "count": 1}}, output=output)


def refused_before_servers(root: Path, job: Path, output: str, *words: str) -> str:
    """`--dry-run` and `run` both exit 2 with `words` in the message; the run left no job folder."""
    for args in (("--dry-run",), ()):
        result = run_tensorfleet("run", job, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        for word in words:
            assert word in result.stderr, (word, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (root / f"{output}.tfjob").exists()  # no folder: nothing planned, no server log
    assert not (root / output).exists()
    return result.stderr


def test_a_ragged_output_to_parquet_is_refused_naming_hdf5_and_its_lengths_output(work):
    root, _ = work
    job = ragged_job(root, "to-parquet", {"path": "out/ragged.parquet"})
    message = refused_before_servers(root, job, "out/ragged.parquet", "'states'", "[-1, 3]",
                                     "output.ragged: {states: length}", ".h5")
    assert "leave it out with output.tensors" in message and "keep: length" in message


def test_a_ragged_output_to_hdf5_without_output_ragged_is_refused_naming_the_mapping(work):
    root, _ = work
    job = ragged_job(root, "no-home", {"path": "out/flat.h5"})
    refused_before_servers(root, job, "out/flat.h5", "no ragged home", "output.ragged: {states: length}")


def test_output_ragged_naming_a_non_integer_lengths_output_is_refused(work):
    root, _ = work
    job = ragged_job(root, "bad-lengths", {"path": "out/bad.h5", "ragged": {"length": "states"}})
    refused_before_servers(root, job, "out/bad.h5", "output.ragged", "'states'", "integer")


def test_a_ragged_output_with_its_home_runs_and_stores_every_row(work):
    root, x = work
    with h5py.File(root / "out" / "ragged.h5") as f:
        offsets, flat = f["states_offsets"][:], f["states"][:]
    lengths = np.clip(x[:, 0], 0, 5).astype(int)
    assert np.diff(offsets).tolist() == lengths.tolist()
    for row in range(len(x)):
        assert (flat[offsets[row] : offsets[row + 1]] == x[row, 1]).all()


def test_h5ad_layers_of_a_width_other_than_n_vars_are_refused_before_servers_start(tmp_path):
    genes = MODEL_GENES[:18] + ["extra1", "extra2", "extra3"]  # 21 genes; the model returns 4 values a cell
    write_current(tmp_path / "cells.h5ad", expression(24, genes, seed=4), genes, "csr", raw=False)
    job = write_job(tmp_path / "job.yaml", input={"path": "cells.h5ad", "align": {"min_coverage": 0.8}},
                    model=local_model("genes"), output={"path": "out.h5ad", "h5ad_slot": "layers"})
    refused_before_servers(tmp_path, job, "out.h5ad", "n_vars", "21 genes", "'embedding' [4]",
                           "output.h5ad_slot: obsm")


def test_h5ad_layers_from_an_input_with_no_genes_are_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((4, 8), np.float32))
    job = write_job(tmp_path / "job.yaml", input={"path": "x.npy", "tensors": {"x": "array"}},
                    model=local_model("vec8"), output={"path": "out.h5ad", "h5ad_slot": "layers"})
    refused_before_servers(tmp_path, job, "out.h5ad", "not .h5ad", "output.h5ad_slot: obsm")


def test_over_length_error_on_a_model_with_no_max_length_is_refused_naming_the_config(tmp_path):
    (tmp_path / "in.fasta").write_text(">a\nMKV\n>b\nMKVLA\n")
    job = write_job(tmp_path / "job.yaml", input={"path": "in.fasta", "over_length": "error"},
                    model=local_model("embed"), output={"path": "out.h5"})
    refused_before_servers(tmp_path, job, "out.h5", "input.over_length: error has no effect",
                           "declares no max_length", "config.yaml", "max_length: N")


def test_keep_input_naming_a_column_the_input_lacks_is_refused(tmp_path):
    (tmp_path / "in.csv").write_text("smiles,a\nCCO,1.0\nCCN,2.0\n")
    job = write_job(tmp_path / "job.yaml", input={"path": "in.csv", "tensors": {"x": "a,a,a,a,a,a,a,a"}},
                    model=local_model("vec8"), output={"path": "out.csv", "keep_input": ["smile"]})
    refused_before_servers(tmp_path, job, "out.csv", "output.keep_input", "'smile'", "smiles")


def test_running_servers_are_asked_once_and_the_job_stops_before_a_row_is_sent(tmp_path, servers):
    genes = MODEL_GENES[:18] + ["extra1", "extra2", "extra3"]
    write_current(tmp_path / "cells.h5ad", expression(24, genes, seed=4), genes, "csr", raw=False)
    job = write_job(tmp_path / "job.yaml", input={"path": "cells.h5ad", "align": {"min_coverage": 0.8}},
                    model={"name": "genes", "servers": [s.address for s in servers]},
                    output={"path": "out.h5ad", "h5ad_slot": "layers"})
    result = run_tensorfleet("run", job)
    assert result.returncode == 2 and "output.h5ad_slot: obsm" in result.stderr, result.stderr
    assert not (tmp_path / "out.h5ad.tfjob" / "manifest.sqlite").exists()  # nothing planned, nothing sent


# --- a model that will not load --------------------------------------------------------------
def test_a_local_model_that_fails_to_load_ends_the_job_with_its_error_and_keeps_the_logs(work):
    root, _ = work
    job = write_job(root / "broken.yaml", input={"path": "x.npy", "tensors": {"x": "array"}},
                    model={"name": "broken", "local": {"repository": "repo", "count": 1, "startup_timeout_s": 600}},
                    output={"path": "out/broken.h5"}, policy={"server_wait_s": 600})
    # fail fast: the server exits at its load error, so the run ends long before either 600 s wait
    result = run_tensorfleet("run", job, timeout=180)
    assert result.returncode == 2, result.stderr
    assert "checkpoint shards disagree: found 3 of 4" in result.stderr
    assert "no server reachable" not in result.stderr and "Start servers" not in result.stderr
    job_dir = root / "out" / "broken.h5.tfjob"
    log = (job_dir / "servers" / "server-0.log").read_text()
    assert "model-00004.safetensors is missing" in log  # the folder and its log are kept
    assert str(job_dir / "servers" / "server-0.log") in result.stderr
    status = run_tensorfleet("status", job, "--json")  # by the job file
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "failed"
    # fixed, the same command runs in the kept folder
    (root / "repo" / "broken" / "model.py").write_text(BROKEN_MODEL.replace("raise RuntimeError", "return None  #"))
    again = run_tensorfleet("run", job)
    assert again.returncode == 0, again.stderr
    with h5py.File(root / "out" / "broken.h5") as f:
        np.testing.assert_array_equal(f["y"][:], np.load(root / "x.npy"))


def test_a_running_server_whose_model_failed_to_load_is_named_at_once(tmp_path):
    model_folder(tmp_path / "repo", "broken", BROKEN_CONFIG, BROKEN_MODEL)
    np.save(tmp_path / "x.npy", np.ones((4, 2), np.float32))
    with running_server(tmp_path / "repo") as server:  # serves on, its model UNAVAILABLE
        job = write_job(tmp_path / "job.yaml", input={"path": "x.npy", "tensors": {"x": "array"}},
                        model={"name": "broken", "servers": [server.address]}, output={"path": "out.h5"},
                        policy={"server_wait_s": 600})
        result = run_tensorfleet("run", job, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "could not load model 'broken'" in result.stderr
    assert "checkpoint shards disagree: found 3 of 4" in result.stderr
    assert "no server reachable" not in result.stderr


# --- status on a job file or an output -------------------------------------------------------
def test_status_takes_the_job_file_or_the_output_as_well_as_the_folder(work):
    root, x = work
    reports = []
    for target in (root / "out" / "ragged.h5.tfjob", root / "ragged.yaml", root / "out" / "ragged.h5"):
        result = run_tensorfleet("status", target, "--json")
        assert result.returncode == 0, (target, result.stderr)
        reports.append(json.loads(result.stdout))
    assert all(report["job_dir"] == reports[0]["job_dir"] for report in reports)
    assert reports[0]["state"] == "done" and reports[0]["rows_done"] == len(x)


def test_status_on_a_file_that_is_no_job_says_what_to_pass(work):
    root, _ = work
    for target, words in ((root / "x.npy", "is a file, not a job folder"), (root / "nowhere.h5", "does not exist")):
        result = run_tensorfleet("status", target)
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr
        assert "job folder" in result.stderr
