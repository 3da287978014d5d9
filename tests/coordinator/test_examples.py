"""The example job files stay runnable: the protein job plans, the .h5ad job runs on a small copy."""

from __future__ import annotations

import subprocess
import sys

import anndata
import numpy as np
import pytest
import yaml

from .helpers import REPO_ROOT, run_tensorfleet

JOBS = REPO_ROOT / "examples" / "jobs"


def test_protein_example_job_plans_two_local_servers():
    if not (REPO_ROOT / "examples" / "data" / "proteins.fasta").exists():
        pytest.skip("examples/data/proteins.fasta not built (examples/build_models.py)")
    result = run_tensorfleet("run", JOBS / "protein-embeddings.yaml", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "2 local server(s)" in result.stdout and "rows: 2000" in result.stdout
    assert "protein-embeddings.h5 (hdf5)" in result.stdout


def test_h5ad_example_job_writes_obsm_and_keeps_obs(tmp_path):
    subprocess.run(
        [sys.executable, str(JOBS / "make_h5ad.py"), "--cells", "300", "--out", str(tmp_path / "cells.h5ad")], check=True
    )
    spec = yaml.safe_load((JOBS / "cell-embeddings.yaml").read_text())
    spec["input"]["path"] = str(tmp_path / "cells.h5ad")
    spec["output"]["path"] = str(tmp_path / "cells.embedded.h5ad")
    spec["model"]["local"]["repository"] = str(JOBS / spec["model"]["local"]["repository"])
    spec["model"]["local"]["count"] = 1
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    result = run_tensorfleet("run", tmp_path / "job.yaml")
    assert result.returncode == 0, result.stderr
    source, out = anndata.read_h5ad(tmp_path / "cells.h5ad"), anndata.read_h5ad(tmp_path / "cells.embedded.h5ad")
    assert list(out.obs_names) == list(source.obs_names)
    assert (out.obs["cell_type"] == source.obs["cell_type"]).all()
    assert list(out.var_names) == list(source.var_names)
    embedding = out.obsm["X_cell_embedder"]
    assert embedding.shape == (300, 32)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)
    # The model declares sparse: csr: rows went over as CSR; the same CSR rows in-process, in the
    # job's 128-row requests, give the same bits.
    import importlib.util
    from types import SimpleNamespace

    from tensorfleet.services.model_config import load_config

    folder = JOBS / "models" / "cell_embedder"
    loaded = importlib.util.spec_from_file_location("example_cell_embedder", folder / "model.py")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    model = module.Model()
    model.load(SimpleNamespace(config=load_config(folder)))
    counts = source.X.tocsr()
    expected = np.concatenate([model.predict({"counts": counts[a : a + 128]})["embedding"] for a in range(0, 300, 128)])
    assert np.array_equal(embedding.view(np.uint32), expected.view(np.uint32))
