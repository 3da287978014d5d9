"""Every output says how it was made (issue 29): the per-job model parameters sent with every
request (STACK's diffusion steps), the gene alignment's coverage and the over-length policy, in
each format's own place: HDF5 attributes, parquet metadata, .h5ad uns, a CSV's provenance file.
Two outputs made with different parameters can then be told apart."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import h5py
import pyarrow.parquet as pq
import pytest
import yaml

from .h5ad_files import expression, write_current
from .helpers import MODELS, local_model, make_fasta, run_tensorfleet, write_job

MODEL_GENES = (MODELS / "genes" / "genes.txt").read_text().split()


def read_provenance(path: Path, fmt: str) -> dict:
    """The provenance as each format stores it, values decoded where the format keeps JSON text."""
    if fmt == "hdf5":
        with h5py.File(path) as handle:
            raw = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in handle.attrs.items()}
    elif fmt == "parquet":
        raw = json.loads(pq.read_schema(path).metadata[b"tensorfleet"])
    elif fmt == "h5ad":
        raw = dict(anndata.read_h5ad(path).uns["tensorfleet"]["provenance"])
    else:
        raw = json.loads(path.with_name(path.stem + ".provenance.json").read_text())
    out = {}
    for key, value in raw.items():
        if isinstance(value, str) and value[:1] in "{[":
            value = json.loads(value)
        out[key] = value.item() if hasattr(value, "item") else value
    return out


@pytest.mark.parametrize("fmt,suffix", [("hdf5", "h5"), ("parquet", "parquet"), ("h5ad", "h5ad"), ("csv", "csv")])
def test_parameters_alignment_and_over_length_policy_reach_every_format(tmp_path, servers, fmt, suffix):
    genes = MODEL_GENES[:18] + ["extra1", "extra2", "extra3"]  # 18 of the model's 20 genes
    write_current(tmp_path / "cells.h5ad", expression(24, genes, seed=4), genes, "csr", raw=False)
    outputs = {}
    for steps in (10, 50):
        job = write_job(
            tmp_path / f"job{steps}.yaml",
            # over_length left at its default: `error` is refused for a model with no max_length (output_checks.py)
            input={"path": "cells.h5ad", "align": {"min_coverage": 0.8}},
            model={"name": "genes", "servers": [s.address for s in servers], "parameters": {"steps": steps}},
            output={"path": f"out{steps}.{suffix}"}, chunking={"chunk_rows": 8},
        )
        result = run_tensorfleet("run", job)
        assert result.returncode == 0, result.stderr
        outputs[steps] = read_provenance(tmp_path / f"out{steps}.{suffix}", fmt)
    for steps, provenance in outputs.items():
        assert provenance["model_parameters"] == {"steps": steps}, provenance
        assert provenance["alignment_coverage"] == pytest.approx(0.9)
        assert provenance["alignment_missing"] == 2
        assert provenance["over_length_policy"] == "truncate"
        assert provenance["model_name"] == "genes"
    assert outputs[10]["spec_sha256"] != outputs[50]["spec_sha256"]


def test_a_multi_stage_output_names_every_stages_model_and_parameters(tmp_path):
    """Not the last stage's alone: each stage's parameters change the output."""
    make_fasta(tmp_path / "in.fasta", 60)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "name": "two", "input": {"path": "in.fasta", "over_length": "truncate"}, "output": {"path": "out.h5"},
        "stages": [
            {"name": "embed", "model": {**local_model("embed"), "parameters": {"steps": 4}}},
            {"name": "head", "model": {**local_model("head16"), "parameters": {"temperature": 0.5}},
             "tensors": {"x": "embedding"}},
        ],
        "chunking": {"chunk_rows": 32},
    }))
    result = run_tensorfleet("run", tmp_path / "job.yaml")
    assert result.returncode == 0, result.stderr
    provenance = read_provenance(tmp_path / "out.h5", "hdf5")
    assert provenance["model_name"] == "head16" and provenance["model_parameters"] == {"temperature": 0.5}
    stages = provenance["stages"]
    assert [s["stage"] for s in stages] == ["embed", "head"]
    assert [s["model_name"] for s in stages] == ["embed", "head16"]
    assert [s["model_parameters"] for s in stages] == [{"steps": 4}, {"temperature": 0.5}]
    assert provenance["over_length_policy"] == "truncate"


def test_the_over_length_count_and_no_parameters_are_recorded_too(tmp_path, servers):
    make_fasta(tmp_path / "in.fasta", 50)  # 5 to 90 residues; seqlen takes at most 40
    job = write_job(tmp_path / "job.yaml", input={"path": "in.fasta"},
                    model={"name": "seqlen", "servers": [s.address for s in servers]}, output={"path": "out.parquet"})
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    provenance = read_provenance(tmp_path / "out.parquet", "parquet")
    assert provenance["over_length_policy"] == "truncate"
    assert provenance["over_length.sequence"] > 0 and provenance["model_parameters"] == {}
