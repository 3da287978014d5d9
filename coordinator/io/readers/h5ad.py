"""AnnData .h5ad, through anndata's own readers: X, raw/X, layers/NAME, obsm/NAME; obs names as ids.

Any encoding anndata reads: today's (encoding-type attributes), 0.7's, and the one before
0.7 (obs/var as compound datasets, `raw.X`/`raw.var` at the top, obsm as one compound
dataset, sparse groups marked `h5sparse_format`). Rows are read by range, never the whole
matrix:
- dense: an h5py slice of the dataset;
- CSR: `safety.read_sparse_block` of rows [start, stop): one block of rows is its offsets, then
  its entries, each read in one piece and checked (offsets monotone, indices within the columns)
  before scipy sees them; the shape is the group's `shape` attribute (`h5sparse_shape` before
  0.7) and the dtype its data's, so no anndata object is made, at open or per read, and a
  CSR job imports neither anndata nor scipy. `read_block` keeps the rows sparse (`csr_rows.CsrRows`), so
  the request source holds a chunk's rows at their stored size and densifies per request only
  for models that take dense rows;
- CSC: stored by column, so a row range touches every column. Rows are converted in blocks:
  one pass over the columns (in column blocks, each read and checked the same way) turns a
  block of rows into CSR, kept for the reads that follow. Each block reads the whole matrix
  once; a block holds about `CSC_BLOCK_BYTES` of entries (12 bytes each), so a job reads the
  matrix `12 x nnz / CSC_BLOCK_BYTES` times (more often when chunks are larger than a block).
  For large CSC files convert once: `adata.X = adata.X.tocsr()`.
obs, var and the small metadata are read with `anndata.io.read_elem` (imported when first needed).

The file is someone else's: when it is opened every object in it is checked to keep its bytes
in the file (safety.check_tree: no external links, external storage or virtual datasets; the
.h5ad writer copies the whole input), and each sparse matrix's arrays are checked against each
other; each block of a sparse matrix is read and checked by safety.read_sparse_block before
scipy sees it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ...spec import InputSpec
from .base import FieldInfo, InputError, Reader, register
from .hdf5 import as_str_array
from .safety import SparseLayout, check_tree, read_sparse_block, sparse_layout

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse

    from .csr_rows import CsrRows

CSC_BLOCK_BYTES = 256 << 20
_CSC_COLUMNS = 2048


def _attr(item: h5py.HLObject, key: str, default: str = "") -> str:
    value = item.attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _sparse_format(item: h5py.Group) -> str:
    """'csr', 'csc' or '' for a group that is not a sparse matrix."""
    legacy = _attr(item, "h5sparse_format")
    if legacy:
        return legacy
    return {"csr_matrix": "csr", "csc_matrix": "csc"}.get(_attr(item, "encoding-type"), "")


def _sparse_shape(item: h5py.Group, where: str) -> tuple[int, ...]:
    """A sparse group's declared shape (today's `shape` attribute, `h5sparse_shape` before 0.7);
    safety.sparse_layout checks it against the arrays."""
    shape = item.attrs.get("shape", item.attrs.get("h5sparse_shape"))
    try:
        return tuple(int(dim) for dim in shape)
    except (TypeError, ValueError):
        raise InputError(f"{where}: sparse matrix '{item.name}' declares no shape (attribute 'shape')") from None


def read_frame(item: h5py.Group | h5py.Dataset) -> pd.DataFrame:
    """An obs/var frame in any encoding: read_elem for a group, a compound dataset before 0.7."""
    # anndata's imports cost more CPU than a small job's whole dispatch: only a job that reads
    # names or columns (gene alignment, old encodings) pays them
    import pandas as pd
    from anndata.io import read_elem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's OldFormatWarning: reading old files is the point
        value = read_elem(item)
    if isinstance(value, pd.DataFrame):
        return value
    frame = pd.DataFrame(value)  # structured array of the pre-0.7 encoding; its first field is the index
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = [v.decode() if isinstance(v, bytes) else v for v in frame[column]]
    return frame.set_index(frame.columns[0])


def frame_lengths(item: h5py.Group | h5py.Dataset) -> dict[str, int]:
    """The rows an obs/var frame declares, per part (its index, each column; a categorical or
    nullable column by its codes or values), from the HDF5 metadata alone: what `read_frame`
    would read, known before any of it is read."""
    if isinstance(item, h5py.Dataset):
        return {"index": item.shape[0] if item.ndim else 0}
    lengths: dict[str, int] = {}
    index = _attr(item, "_index", "_index")
    for name in [index, *(key for key in item if key not in (index, "__categories"))]:
        element = item.get(name)
        if isinstance(element, h5py.Group):
            element = next((element[key] for key in ("codes", "values") if key in element), None)
        if isinstance(element, h5py.Dataset):
            lengths["index" if name == index else name] = element.shape[0] if element.ndim else 0
    return lengths


#: obs names read at once (about 4 MB as str): h5py's read of variable-length strings costs
#: about as much per call as for thousands of names, so a job's 1,024-row chunks, read one by
#: one, took three times as long as the same names in 65,536-name reads (0.18 s / 0.06 s for
#: 200,000 names).
NAMES_BLOCK = 65536


class _Names:
    """obs names by row range without loading them all: today's string dataset, or the first
    field of a pre-0.7 compound dataset. The last NAMES_BLOCK names read are kept, so the
    chunks of a job read them from memory."""

    def __init__(self, obs: h5py.Group | h5py.Dataset) -> None:
        if isinstance(obs, h5py.Dataset):
            self._dataset, self._field = obs, obs.dtype.names[0]
        else:
            self._dataset, self._field = obs[_attr(obs, "_index", "_index")], None
        self._block: tuple[int, int, np.ndarray] = (0, 0, np.empty(0, dtype=object))

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self._dataset))
        stop = max(start, stop)
        lo, hi, names = self._block
        if not (lo <= start and stop <= hi):
            lo, hi = start, min(len(self._dataset), max(stop, start + NAMES_BLOCK))
            names = self._read(lo, hi)
            self._block = (lo, hi, names)
        return names[start - lo : stop - lo].copy()  # a copy: callers may rename in place (views.py)

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self._field is None:
            return as_str_array(self._dataset[start:stop])
        return as_str_array(self._dataset.fields([self._field])[start:stop][self._field])


@register("h5ad")
class H5adReader(Reader):
    default_field = "X"

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        self._file = h5py.File(spec.path, "r")
        if "obs" not in self._file:
            self._file.close()
            raise InputError(f"{spec.path} has no obs; is it an .h5ad file?")
        try:
            check_tree(self._file, spec.path)
        except InputError:
            self._file.close()
            raise
        self._names = _Names(self._file["obs"])
        #: field -> (h5py item, compound field name for pre-0.7 obsm)
        self._items: dict[str, tuple[h5py.HLObject, str | None]] = {}
        self._fields: dict[str, FieldInfo] = {}
        self._sparse: dict[str, SparseLayout] = {}
        self._csc_block: tuple[str, int, int, object] | None = None
        #: Estimated bytes a row takes in a block, per field (sparse: its mean stored entries).
        self._row_bytes: dict[str, float] = {}
        candidates = {"X": "X", "raw/X": "raw/X" if "raw/X" in self._file else "raw.X"}
        for group in ("layers", "obsm"):
            item = self._file.get(group)
            if isinstance(item, h5py.Group):
                candidates.update({f"{group}/{key}": f"{group}/{key}" for key in item})
            elif isinstance(item, h5py.Dataset) and item.dtype.names:  # pre-0.7 obsm: one compound dataset
                for name in item.dtype.names:
                    self._add(f"{group}/{name}", item, name)
        for name, path in candidates.items():
            if path in self._file:
                self._add(name, self._file[path], None)

    def _add(self, name: str, item: h5py.HLObject, member: str | None) -> None:
        if member is not None:
            kind = item.dtype.fields[member][0]
            info = FieldInfo(name, kind.base, tuple(kind.shape))
        elif isinstance(item, h5py.Dataset):
            if item.dtype.kind not in "biuf" or item.ndim < 1:
                return  # strings, categories: not model inputs
            info = FieldInfo(name, item.dtype, tuple(item.shape[1:]))
        elif _sparse_format(item):
            shape = _sparse_shape(item, self.spec.path)
            dtype = item["data"].dtype if isinstance(item.get("data"), h5py.Dataset) else np.dtype("f4")
            info = FieldInfo(name, dtype, tuple(shape[1:]))
            layout = sparse_layout(item, _sparse_format(item), shape, self.spec.path)
            self._sparse[name] = layout
            rows = max(int(shape[0]), 1)
            self._row_bytes[name] = max(layout.nnz / rows, 1.0) * (info.dtype.itemsize + item["indices"].dtype.itemsize)
        else:
            return  # a data frame or mapping in obsm: nothing a model can take
        self._items[name] = (item, member)
        self._fields[name] = info

    @property
    def num_rows(self) -> int:
        return len(self._names)

    def fields(self) -> dict[str, FieldInfo]:
        return self._fields

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        block = self.read_block(field, start, stop)
        return block if isinstance(block, np.ndarray) else np.asarray(block.toarray())

    def read_block(self, field: str, start: int, stop: int) -> np.ndarray | CsrRows | scipy.sparse.csr_matrix:
        """Rows [start, stop) as stored: dense fields as arrays, sparse ones as CSR (never densified)."""
        if field not in self._fields:
            raise InputError(f"no field '{field}' in {self.spec.path} (has: {sorted(self._fields)})")
        item, member = self._items[field]
        if member is not None:
            return item.fields([member])[start:stop][member]
        if isinstance(item, h5py.Dataset):
            return item[start:stop]
        if self._sparse[field].kind == "csr":
            return self._csr_rows(field, start, stop)
        return self._csc_rows(field, item, start, stop)

    def row_bytes(self, field: str) -> float:
        return self._row_bytes.get(field) or super().row_bytes(field)

    def _csr_rows(self, field: str, start: int, stop: int) -> CsrRows:
        """One block of a CSR matrix, read and checked by `safety.read_sparse_block`."""
        layout = self._sparse[field]
        rows = layout.shape[0]
        start, stop = max(0, min(start, rows)), max(0, min(stop, rows))
        return read_sparse_block(layout, start, max(start, stop))

    def _csc_rows(self, field: str, item: h5py.Group, start: int, stop: int) -> scipy.sparse.csr_matrix:
        import scipy.sparse

        block = self._csc_block
        if block is None or block[0] != field or not (block[1] <= start and stop <= block[2]):
            layout = self._sparse[field]
            rows, columns = layout.shape
            per_row = max(layout.nnz / max(rows, 1), 1.0)
            size = max(stop - start, int(CSC_BLOCK_BYTES / (12 * per_row)))
            lo, hi = start, min(rows, start + size)
            pieces = [
                read_sparse_block(layout, c, min(c + _CSC_COLUMNS, columns))[lo:hi].tocsr()
                for c in range(0, columns, _CSC_COLUMNS)
            ]
            combined = scipy.sparse.hstack(pieces, format="csr") if pieces else scipy.sparse.csr_matrix((hi - lo, 0))
            block = self._csc_block = (field, lo, hi, combined)
        _, lo, _, combined = block
        return combined[start - lo : stop - lo]

    def feature_names(self, field: str, column: str | None = None) -> np.ndarray | None:
        """Names of `field`'s columns (var names, raw/X: raw var names, or a var column); None for obsm."""
        if field == "X" or field.startswith("layers/"):
            key = "var"
        elif field == "raw/X":
            key = "raw/var" if "raw/var" in self._file else "raw.var"
        else:
            return None
        if key not in self._file:
            return None
        shape = self._fields[field].row_shape if field in self._fields else ()
        width = shape[-1] if shape else 0
        for part, length in frame_lengths(self._file[key]).items():
            if length != width:
                raise InputError(
                    f"{self.spec.path}: {key} {'index' if part == 'index' else f'column {part!r}'} declares "
                    f"{length} rows but {field} has {width} columns; they must be equal (one name per gene)"
                )
        frame = read_frame(self._file[key])
        if column is None:
            return np.asarray(frame.index.astype(str))
        if column not in frame.columns:
            raise InputError(f"input.align.var_column: no column '{column}' in {key} (has: {sorted(frame.columns)})")
        return np.asarray(frame[column].astype(str))

    def ids(self, start: int, stop: int) -> np.ndarray:
        return self._names[start:stop]

    def close(self) -> None:
        self._file.close()
