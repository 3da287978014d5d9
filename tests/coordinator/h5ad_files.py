"""h5ad files as other tools write them: today's anndata (X dense, CSR, CSC, with raw) and the
encoding of anndata before 0.7, written field by field with h5py (old anndata cannot be
installed next to today's): obs/var as compound datasets, categories in uns, `raw.X` and
`raw.var` at the top, obsm as one compound dataset, sparse groups marked `h5sparse_format`."""

from __future__ import annotations

from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse


def expression(n_obs: int, genes: list[str], seed: int = 0) -> np.ndarray:
    """Counts-like float32 matrix, about 70% zeros."""
    rng = np.random.default_rng(seed)
    values = rng.poisson(0.6, size=(n_obs, len(genes))).astype(np.float32)
    values[rng.random(values.shape) < 0.4] = 0
    return values


def write_current(path: Path, x: np.ndarray, genes: list[str], layout: str = "dense", raw: bool = True) -> anndata.AnnData:
    """anndata.write_h5ad with X dense, csr or csc, plus raw, obsm, obsp, layers, uns, categories."""
    n_obs = len(x)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(["T", "B", "NK"] * (n_obs // 3) + ["T"] * (n_obs % 3)),
         "n_counts": x.sum(axis=1)},
        index=[f"cell{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame({"gene_ids": [f"ENSG{i:05d}" for i in range(len(genes))]}, index=genes)
    matrix = {"dense": x, "csr": scipy.sparse.csr_matrix(x), "csc": scipy.sparse.csc_matrix(x)}[layout]
    adata = anndata.AnnData(X=matrix, obs=obs, var=var)
    adata.obsm["X_pca"] = np.arange(n_obs * 3, dtype=np.float32).reshape(n_obs, 3)
    adata.obsp["connectivities"] = scipy.sparse.eye(n_obs, format="csr", dtype=np.float32)
    adata.layers["counts"] = x * 2
    adata.uns["title"] = "atlas"
    adata.uns["params"] = {"k": 15}
    if raw:
        adata.raw = adata.copy()
    adata.write_h5ad(path)
    return adata


def _strings(values: list[str]) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=f"S{max(len(v) for v in values)}")


def write_pre_0_7(path: Path, x: np.ndarray, genes: list[str], sparse: bool = False) -> None:
    """The layout anndata 0.6 wrote (no encoding attributes)."""
    n_obs = len(x)
    names = [f"cell{i}" for i in range(n_obs)]
    codes = np.array([i % 3 for i in range(n_obs)], dtype=np.int8)
    with h5py.File(path, "w") as f:
        obs = np.zeros(n_obs, dtype=[("index", f"S{max(map(len, names))}"), ("cell_type", "i1"), ("n_counts", "f4")])
        obs["index"], obs["cell_type"], obs["n_counts"] = _strings(names), codes, x.sum(axis=1)
        f.create_dataset("obs", data=obs)
        var = np.zeros(len(genes), dtype=[("index", f"S{max(map(len, genes))}"), ("gene_ids", "S10")])
        var["index"], var["gene_ids"] = _strings(genes), _strings([f"ENSG{i:05d}" for i in range(len(genes))])
        f.create_dataset("var", data=var)
        if sparse:
            matrix = scipy.sparse.csr_matrix(x)
            group = f.create_group("X")
            group.attrs["h5sparse_format"] = "csr"
            group.attrs["h5sparse_shape"] = np.array(matrix.shape)
            for key in ("data", "indices", "indptr"):
                group.create_dataset(key, data=getattr(matrix, key))
        else:
            f.create_dataset("X", data=x)
        obsm = np.zeros(n_obs, dtype=[("X_pca", "f4", (3,))])
        obsm["X_pca"] = np.arange(n_obs * 3, dtype=np.float32).reshape(n_obs, 3)
        f.create_dataset("obsm", data=obsm)
        f.create_dataset("raw.X", data=x * 3)
        f.create_dataset("raw.var", data=var)
        uns = f.create_group("uns")
        uns.create_dataset("cell_type_categories", data=_strings(["B", "NK", "T"]))
        uns.create_dataset("title", data=np.array([b"atlas"]))
