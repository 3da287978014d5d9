"""Writes this folder's .h5ad files with an old anndata itself, so the readers are tested
against what those versions really wrote (not a re-creation of their layout).

Each version needs a venv of its own (they cannot be installed next to today's anndata):

    python3 -m venv /tmp/ad07 && /tmp/ad07/bin/pip install anndata==0.7.8 pandas==1.5.3 \
        numpy==1.26.4 "scipy<1.14" "h5py<3.12"
    /tmp/ad07/bin/python tests/coordinator/data/old_anndata/make.py
    (the same with anndata==0.6.22.post1 for the 0.6 files)

Files: anndata-VERSION-LAYOUT.h5ad, LAYOUT dense, csr or csc: 24 cells x the 20 genes of
tests/coordinator/models/genes, in reverse order (so that the job must align them), with a
categorical obs column, obsm X_pca, a layer, raw and uns. Fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse

HERE = Path(__file__).resolve().parent
GENES = (HERE.parents[1] / "models" / "genes" / "genes.txt").read_text().split()[::-1]


def make(layout: str) -> anndata.AnnData:
    rng = np.random.default_rng(7)
    x = rng.poisson(0.8, size=(24, len(GENES))).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(["T", "B", "NK"] * 8), "n_counts": x.sum(axis=1)},
        index=[f"cell{i:02d}" for i in range(24)],
    )
    var = pd.DataFrame({"gene_ids": [f"ENSG{i:05d}" for i in range(len(GENES))]}, index=GENES)
    matrix = {"dense": x, "csr": scipy.sparse.csr_matrix(x), "csc": scipy.sparse.csc_matrix(x)}[layout]
    adata = anndata.AnnData(X=matrix, obs=obs, var=var)
    adata.obsm["X_pca"] = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    adata.layers["counts"] = matrix * 2
    adata.uns["title"] = "atlas"
    adata.raw = adata
    return adata


if __name__ == "__main__":
    for layout in ("dense", "csr", "csc"):
        path = HERE / f"anndata-{anndata.__version__}-{layout}.h5ad"
        make(layout).write_h5ad(path)
        print(f"wrote {path}")
