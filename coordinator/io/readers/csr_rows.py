"""Rows of a CSR matrix as three numpy arrays: what a chunk's block of a sparse input holds.

The request source slices each request's rows from its chunk's block and sends them as the
three CSR tensors (core/sparse.py) or densifies them. scipy's `csr_matrix` would do it, but
importing `scipy.sparse` costs the coordinator ~0.2 s of CPU (it imports much of numpy with
it) and its row indexing has a fixed cost per call of the order of a small request's whole
encoding; these few operations are numpy alone. The entries keep their stored order, row by
row, so the tensors sent are those scipy's slicing gives, and `toarray` sums repeated
(row, column) entries in stored order, as scipy does.
"""

from __future__ import annotations

import numpy as np


class CsrRows:
    """`shape[0]` rows of `shape[1]` columns: row i's entries are data/indices[indptr[i]:indptr[i + 1]].
    `indptr` need not start at 0 (a row range is a view of its block's arrays)."""

    format = "csr"
    __slots__ = ("data", "indices", "indptr", "shape")

    def __init__(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, columns: int) -> None:
        self.data, self.indices, self.indptr = data, indices, indptr
        self.shape = (len(indptr) - 1, int(columns))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice | np.ndarray) -> CsrRows:
        """The rows of a range (views, no copy) or of an index array (gathered, in its order)."""
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step == 1:
                return CsrRows(self.data, self.indices, self.indptr[start : max(start, stop) + 1], self.shape[1])
            rows = np.arange(start, stop, step)
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        positions = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1], dtype=np.int64)
        return CsrRows(self.data[positions], self.indices[positions], indptr, self.shape[1])

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values, column indices, row offsets from 0) of these rows alone."""
        first, last = int(self.indptr[0]), int(self.indptr[-1])
        return self.data[first:last], self.indices[first:last], self.indptr - first

    def tocsr(self) -> CsrRows:
        return self

    def toarray(self) -> np.ndarray:
        values, columns, offsets = self.entries()
        out = np.zeros(self.shape, dtype=self.data.dtype)
        rows = np.repeat(np.arange(self.shape[0], dtype=np.int64), np.diff(offsets))
        flat = rows * self.shape[1] + columns
        if len(flat) < 2 or bool((flat[1:] > flat[:-1]).all()):  # sorted, no repeats: anndata writes these
            out.reshape(-1)[flat] = values
        else:
            np.add.at(out, (rows, columns), values)  # repeated entries summed, in stored order
        return out
