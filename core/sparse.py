"""Sparse (CSR) rows on the wire: three tensors, since the Open Inference Protocol has no sparse type.

A model input `NAME` that declares `sparse: csr` (its row shape is `[columns]`) takes a
request's rows as:

- `NAME`          the stored values, row after row: the input's datatype, shape `[nnz]`;
- `NAME.indices`  the column of each value: INT32 (or INT64), shape `[nnz]`, each in `0..columns-1`;
- `NAME.indptr`   where each row starts in the two above: INT64 (or INT32), shape `[rows + 1]`,
                  starting at 0, never decreasing, ending at `nnz`.

The rows are `len(indptr) - 1`; the columns come from the model's config. Both sides here
(coordinator and server) share this module so the convention lives in one place;
docs/protocol.md describes it for other clients. A dense `[rows, columns]` tensor named
`NAME` is also accepted by such a model (the server converts it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidArgument

INDICES_SUFFIX = ".indices"
INDPTR_SUFFIX = ".indptr"
#: ModelConfig.parameters key that tells clients an input takes CSR rows: `sparse.<input>` = "csr".
PARAMETER_PREFIX = "sparse."


def csr_tensors(name: str, matrix: Any, values_dtype: np.dtype) -> dict[str, np.ndarray]:
    """The three tensors of a scipy CSR matrix's rows (values cast to the input's dtype)."""
    indptr = np.asarray(matrix.indptr, dtype=np.int64)
    first = int(indptr[0]) if len(indptr) else 0
    last = int(indptr[-1]) if len(indptr) else 0
    return {
        name: np.ascontiguousarray(matrix.data[first:last], dtype=values_dtype),
        name + INDICES_SUFFIX: np.ascontiguousarray(matrix.indices[first:last], dtype=np.int32),
        name + INDPTR_SUFFIX: indptr - first,
    }


def as_csr(value: Any) -> Any:
    """Rows as a CSR matrix: CSR as it is (scipy's, or any object with CSR's `format`, `data`,
    `indices` and `indptr`, such as the coordinator's CsrRows), anything else (dense rows a client
    sent) converted by scipy."""
    if getattr(value, "format", None) == "csr" and all(hasattr(value, a) for a in ("data", "indices", "indptr")):
        return value
    import scipy.sparse

    if scipy.sparse.issparse(value) and value.format == "csr":
        return value
    return scipy.sparse.csr_matrix(value)


def check_csr(name: str, values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, columns: int) -> int:
    """The row count of a valid CSR triple; InvalidArgument naming the tensor that is not.

    Checked before anything builds a matrix from them: scipy trusts its index arrays."""
    if values.ndim != 1 or indices.ndim != 1 or indptr.ndim != 1:
        raise InvalidArgument(f"input '{name}': sparse CSR tensors are one-dimensional ('{name}', "
                              f"'{name}{INDICES_SUFFIX}', '{name}{INDPTR_SUFFIX}')")
    if indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
        raise InvalidArgument(f"input '{name}': '{name}{INDICES_SUFFIX}' and '{name}{INDPTR_SUFFIX}' hold integers "
                              f"(INT32 or INT64), got {indices.dtype} and {indptr.dtype}")
    if len(indices) != len(values):
        raise InvalidArgument(f"input '{name}': {len(values)} values but {len(indices)} column indices "
                              f"('{name}{INDICES_SUFFIX}'); one index per value")
    if len(indptr) < 2:
        raise InvalidArgument(f"input '{name}{INDPTR_SUFFIX}': {len(indptr)} offsets; rows + 1 (at least 2) expected")
    if int(indptr[0]) != 0 or int(indptr[-1]) != len(values):
        raise InvalidArgument(f"input '{name}{INDPTR_SUFFIX}': offsets run {int(indptr[0])}..{int(indptr[-1])}; "
                              f"they start at 0 and end at the value count {len(values)}")
    if (np.diff(indptr) < 0).any():
        raise InvalidArgument(f"input '{name}{INDPTR_SUFFIX}': offsets decrease; a row cannot end before it starts")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= columns):
        raise InvalidArgument(f"input '{name}{INDICES_SUFFIX}': column indices run {int(indices.min())}.."
                              f"{int(indices.max())}; the model takes columns 0..{columns - 1}")
    return len(indptr) - 1
