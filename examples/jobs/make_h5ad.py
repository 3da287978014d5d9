"""Write the .h5ad the cell example job reads: 5,000 synthetic cells x 2,000 genes, sparse counts.

    .venv/bin/python examples/jobs/make_h5ad.py [--cells N] [--out examples/output/cells.h5ad]

Fixed seed, so every run writes the same cells. Three "cell types" differ in which genes
they express, so the embeddings have structure to look at.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

GENES = 2000


def make_cells(cells: int, seed: int = 0) -> anndata.AnnData:
    rng = np.random.default_rng(seed)
    types = np.array(["T cell", "B cell", "monocyte"])[rng.integers(0, 3, cells)]
    base = rng.gamma(0.3, 1.0, GENES)
    programs = {name: rng.gamma(2.0, 1.0, GENES) * (rng.random(GENES) < 0.05) for name in np.unique(types)}
    rates = np.stack([base + programs[name] for name in types]) * rng.lognormal(0, 0.3, (cells, 1))
    counts = sp.csr_matrix(rng.poisson(rates).astype(np.float32))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(types), "n_counts": np.asarray(counts.sum(axis=1)).ravel()},
        index=[f"cell-{i:06d}" for i in range(cells)],
    )
    var = pd.DataFrame({"gene_symbol": [f"GENE{i}" for i in range(GENES)]}, index=[f"ENSG{i:011d}" for i in range(GENES)])
    adata = anndata.AnnData(X=counts, obs=obs, var=var)
    adata.uns["description"] = "synthetic counts for the tensorfleet .h5ad example"
    return adata


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=here.parent / "output" / "cells.h5ad")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    make_cells(args.cells).write_h5ad(args.out)
    print(f"wrote {args.out} ({args.cells} cells x {GENES} genes)")


if __name__ == "__main__":
    main()
