"""The start of an .h5ad output made from several .h5ad inputs (one per sample): the samples
concatenated along obs, as `anndata.concat(..., join="inner")` would for obs, var and X.

What the merged file holds, documented in docs/workloads.md ("Many files, one job"):
- obs: every file's cells in input order, with their own obs names, and the obs columns every
  file has (a column some samples lack is left out, as anndata's inner join does); the writer
  adds `source_file` (each cell's file name) and the outputs;
- var: the genes every file has, in the first file's order (its var columns that every file has);
- X: those genes' columns of every file's X, dense when every X is dense, else CSR.
Slots that belong to one sample (uns, obsm, obsp, layers, raw) are not merged: `output.per_file`
keeps each sample's file whole.

X is streamed, never loaded whole: each file's rows are read in blocks by the .h5ad reader (any
encoding it reads, dense, CSR or CSC, checked as it checks them) and appended with h5py. obs and
var pass through memory (they are per-cell and per-gene tables, as anndata's backed mode holds
them). anndata's own `concat_on_disk` would need dask for dense X, which tensorfleet does not
depend on.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse

from ...spec import InputSpec
from ..readers.h5ad import H5adReader, read_frame

#: Rows of one file read and appended at a time.
BLOCK_ROWS = 4096


def _frames(path: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    with h5py.File(path, "r") as file:
        return read_frame(file["obs"]), read_frame(file["var"])


def _common_var(vars_: list[pd.DataFrame]) -> pd.DataFrame:
    genes = [str(g) for g in vars_[0].index]
    for var in vars_[1:]:
        present = set(map(str, var.index))
        genes = [g for g in genes if g in present]
    columns = [c for c in vars_[0].columns if all(c in var.columns for var in vars_[1:])]
    first = vars_[0].copy()
    first.index = first.index.astype(str)
    return first.loc[genes, columns]


def write_concatenated(paths: list[str], target: Path, rows: int | None) -> None:
    """`paths` concatenated into `target`; `rows`: only the first rows (a --limit run)."""
    frames = [_frames(path) for path in paths]
    counts = [len(obs) for obs, _ in frames]
    if rows is not None:
        counts = [max(0, min(count, rows - sum(counts[:i]))) for i, count in enumerate(counts)]
    var = _common_var([v for _, v in frames])
    obs = pd.concat([obs.iloc[:count] for (obs, _), count in zip(frames, counts, strict=True)], join="inner")
    obs.index = obs.index.astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's ImplicitModificationWarning on string indexes
        anndata.AnnData(obs=obs, var=var).write_h5ad(target)
    genes = list(var.index)
    layouts = []
    for path in paths:
        with h5py.File(path, "r") as file:
            item = file.get("X")
            layouts.append(None if item is None else isinstance(item, h5py.Group))
    if None in layouts:
        return  # a sample without X: the output has none either (the model read obsm or layers)
    readers: list[H5adReader] = []
    try:
        readers.extend(H5adReader(InputSpec(path=path, format="h5ad")) for path in paths)
        sparse = any(layouts)
        dtype = np.result_type(*(reader.fields()["X"].dtype for reader in readers))
        with h5py.File(target, "r+") as out:
            writer = _SparseX(out, dtype, len(genes)) if sparse else _DenseX(out, dtype, sum(counts), len(genes))
            for reader, (_, own_var), count in zip(readers, frames, counts, strict=True):
                position = {str(g): i for i, g in enumerate(own_var.index)}
                columns = np.array([position[g] for g in genes], dtype=np.int64)
                for start in range(0, count, BLOCK_ROWS):
                    block = reader.read_block("X", start, min(start + BLOCK_ROWS, count))
                    writer.append(block[:, columns])
            writer.finish()
    finally:
        for reader in readers:
            reader.close()


class _DenseX:
    def __init__(self, out: h5py.File, dtype: np.dtype, rows: int, columns: int) -> None:
        self.dataset = out.create_dataset("X", shape=(rows, columns), dtype=dtype)
        self.dataset.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        self.filled = 0

    def append(self, block) -> None:
        values = block.toarray() if scipy.sparse.issparse(block) else np.asarray(block)
        self.dataset[self.filled : self.filled + len(values)] = values
        self.filled += len(values)

    def finish(self) -> None:
        pass


class _SparseX:
    """X as anndata's CSR group, appended block by block."""

    def __init__(self, out: h5py.File, dtype: np.dtype, columns: int) -> None:
        self.group = out.create_group("X")
        self.columns = columns
        self.data = self.group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1 << 16,))
        self.indices = self.group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int64,
                                                 chunks=(1 << 16,))
        self.indptr = [np.zeros(1, dtype=np.int64)]
        self.rows = 0

    def append(self, block) -> None:
        matrix = scipy.sparse.csr_matrix(block)
        matrix.sort_indices()
        stored = len(self.data)
        self.data.resize((stored + matrix.nnz,))
        self.indices.resize((stored + matrix.nnz,))
        self.data[stored:] = matrix.data
        self.indices[stored:] = matrix.indices
        self.indptr.append(stored + matrix.indptr[1:].astype(np.int64))
        self.rows += matrix.shape[0]

    def finish(self) -> None:
        self.group.create_dataset("indptr", data=np.concatenate(self.indptr))
        self.group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                                 "shape": np.array([self.rows, self.columns], dtype=np.int64)})
