"""Checks on input files that others wrote, made before their bytes are read (issue #28).

An HDF5 file can hold more than its own bytes: a dataset's raw storage may be another file
(`external=`), a virtual dataset maps other files' datasets, and an external link names another
file. Read through, any of them puts a file outside `--data-root` into the output. A sparse
matrix's index arrays are trusted by scipy's C code (an index past the row segfaults
`toarray`), and its declared sizes cost nothing to write. So:

- `checked_dataset` / `check_tree`: a dataset (or every object under a group) whose bytes are
  not in the file itself is refused, naming it; links are followed only inside the file;
- `SparseLayout` + `read_sparse_block`: a CSR/CSC group's arrays checked against each other when
  opened (lengths, first and last `indptr`), and each block read checked before scipy sees it
  (`indptr` monotone and within the block, indices within the other axis, entries per row
  within `TENSORFLEET_MAX_ROW_BYTES`), so the cost is proportional to what is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import h5py
import numpy as np

from . import base
from .base import InputError
from .csr_rows import CsrRows

if TYPE_CHECKING:
    import scipy.sparse

#: Soft links followed in a row before a path is called circular.
_MAX_LINK_HOPS = 32


def _resolve(file: h5py.File, path: str, where: str) -> h5py.HLObject:
    """The object at `path`, following soft links only inside `file`; InputError for an external link."""
    parts = [part for part in path.split("/") if part]
    node: h5py.Group = file
    hops = 0
    walked: list[str] = []
    while parts:
        name = parts.pop(0)
        link = node.get(name, getlink=True)
        if link is None:
            raise KeyError(f"no object '{path}' in {where}")
        if isinstance(link, h5py.ExternalLink):
            raise InputError(f"{where}: '{'/'.join([*walked, name])}' is an external link to {link.filename}:"
                             f"{link.path}; inputs are read only from the file itself")
        if isinstance(link, h5py.SoftLink):
            hops += 1
            if hops > _MAX_LINK_HOPS:
                raise InputError(f"{where}: '{path}' goes through more than {_MAX_LINK_HOPS} soft links")
            target = link.path
            parts = [part for part in target.split("/") if part] + parts
            if target.startswith("/"):
                node, walked = file, []
            continue
        walked.append(name)
        node = node[name]
        if parts and not isinstance(node, h5py.Group):
            raise KeyError(f"'{'/'.join(walked)}' in {where} is not a group")
    return node


def check_storage(dataset: h5py.Dataset, where: str) -> None:
    """InputError when a dataset's raw bytes are not in its own file."""
    if dataset.external:
        files = sorted({str(entry[0]) for entry in dataset.external})
        raise InputError(f"{where}: dataset '{dataset.name}' keeps its bytes in other files ({', '.join(files)}); "
                         "datasets with external storage are refused")
    if dataset.is_virtual:
        sources = sorted({source.file_name for source in dataset.virtual_sources()})
        raise InputError(f"{where}: dataset '{dataset.name}' is a virtual dataset (reading {', '.join(sources)}); "
                         "virtual datasets are refused")


def checked_dataset(file: h5py.File, path: str, where: str) -> h5py.HLObject:
    """`file[path]`, refused if any link on the way leaves the file or (a dataset) its bytes live elsewhere;
    a group is returned as it is (check_tree checks what is under it)."""
    item = _resolve(file, path, where)
    if isinstance(item, h5py.Dataset):
        check_storage(item, where)
    return item


def check_tree(group: h5py.Group, where: str) -> None:
    """Every link and dataset under `group` (itself included), once: no external link, no dataset
    whose bytes are outside the file. Soft links are not followed: their targets are in the tree
    of the file (and checked there, when the whole file is walked) or are themselves refused when read."""
    if isinstance(group, h5py.Dataset):
        check_storage(group, where)
        return
    bad: list[str] = []

    def visit(name: str, link: h5py.Link) -> None:
        if isinstance(link, h5py.ExternalLink):
            bad.append(f"'{group.name.rstrip('/')}/{name}' is an external link to {link.filename}:{link.path}")
        elif isinstance(link, h5py.HardLink):
            item = group.get(name)
            if isinstance(item, h5py.Dataset):
                try:
                    check_storage(item, where)
                except InputError as error:
                    bad.append(str(error).removeprefix(f"{where}: "))

    group.visititems_links(visit)
    if bad:
        raise InputError(f"{where}: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                         + "; inputs are read only from the file itself")


@dataclass(frozen=True)
class SparseLayout:
    """A CSR or CSC group, checked against itself when opened: `major` rows (CSR) or columns (CSC)
    of `minor` entries each, `nnz` stored entries."""

    group: h5py.Group
    kind: str  # "csr" | "csc"
    shape: tuple[int, int]
    nnz: int
    where: str

    @property
    def major(self) -> int:
        return self.shape[0] if self.kind == "csr" else self.shape[1]

    @property
    def minor(self) -> int:
        return self.shape[1] if self.kind == "csr" else self.shape[0]

    @property
    def entry_bytes(self) -> int:
        return self.group["indices"].dtype.itemsize + self.group["data"].dtype.itemsize


def sparse_layout(group: h5py.Group, kind: str, shape: tuple[int, ...], where: str) -> SparseLayout:
    """InputError unless `group` holds a coherent sparse matrix of `shape`: data, indices and indptr
    datasets stored in the file, indptr one longer than the major axis, starting at 0 and ending
    at len(indices) == len(data). Reads two numbers of indptr, nothing else."""
    name = f"{where}: sparse matrix '{group.name}'"
    if kind not in ("csr", "csc"):
        raise InputError(f"{name}: unknown sparse format '{kind}'")
    if len(shape) != 2 or any(int(dim) < 0 or int(dim) > base.MAX_ROWS for dim in shape):
        raise InputError(f"{name}: shape {tuple(shape)} is not two sizes within 0..{base.MAX_ROWS}")
    arrays = {}
    for key in ("data", "indices", "indptr"):
        item = checked_dataset(group.file, f"{group.name}/{key}", where) if key in group else None
        if not isinstance(item, h5py.Dataset) or item.ndim != 1:
            raise InputError(f"{name}: needs a one-dimensional '{key}' dataset")
        arrays[key] = item
    for key in ("indices", "indptr"):
        if arrays[key].dtype.kind not in "iu":
            raise InputError(f"{name}: '{key}' holds {arrays[key].dtype}, not integers")
    layout = SparseLayout(group, kind, (int(shape[0]), int(shape[1])), len(arrays["indices"]), where)
    if len(arrays["data"]) != layout.nnz:
        raise InputError(f"{name}: 'data' holds {len(arrays['data'])} entries but 'indices' {layout.nnz}")
    indptr = arrays["indptr"]
    if len(indptr) != layout.major + 1:
        axis = "rows" if kind == "csr" else "columns"
        raise InputError(f"{name}: 'indptr' has {len(indptr)} entries for {layout.major} {axis} (needs {layout.major + 1})")
    first, last = int(indptr[0]), int(indptr[-1])
    if first != 0 or last != layout.nnz:
        raise InputError(f"{name}: 'indptr' runs from {first} to {last}; it must run from 0 to {layout.nnz} (the entries stored)")
    return layout


def _checked_indptr(layout: SparseLayout, lo: int, hi: int) -> np.ndarray:
    """indptr[lo:hi + 1] of the major axis, checked: monotone, within 0..nnz, each row's entries bounded."""
    indptr = np.asarray(layout.group["indptr"][lo : hi + 1], dtype=np.int64)
    name = f"{layout.where}: sparse matrix '{layout.group.name}'"
    if len(indptr) != hi - lo + 1:
        raise InputError(f"{name}: 'indptr' ends before {hi}")
    steps = np.diff(indptr)
    if len(indptr) and (indptr.min() < 0 or indptr.max() > layout.nnz):
        raise InputError(f"{name}: 'indptr' points outside 0..{layout.nnz} between {lo} and {hi}")
    if len(steps) and steps.min() < 0:
        at = lo + int(np.argmin(steps))
        raise InputError(f"{name}: 'indptr' decreases at {at} ({indptr[at - lo]} then {indptr[at - lo + 1]}); it must not")
    if len(steps):
        # A row (CSR) or column (CSC) with no more entries than the other axis has cells is what a
        # valid matrix holds (its dense row is bounded already); more means duplicates, bounded in bytes.
        widest = int(steps.max())
        if widest > layout.minor and widest * layout.entry_bytes > base.MAX_ROW_BYTES:
            at = lo + int(np.argmax(steps))
            axis = "row" if layout.kind == "csr" else "column"
            raise InputError(f"{name}: {axis} {at} declares {widest} stored entries ({widest * layout.entry_bytes} bytes) "
                             f"for {layout.minor} cells; at most {base.MAX_ROW_BYTES} bytes (TENSORFLEET_MAX_ROW_BYTES)")
    return indptr


def read_sparse_block(
    layout: SparseLayout, lo: int, hi: int, max_bytes: int | None = None
) -> CsrRows | scipy.sparse.spmatrix:
    """Rows [lo, hi) of a CSR matrix (as CsrRows) or columns [lo, hi) of a CSC matrix (as scipy CSC), read and
    checked: only indptr[lo:hi + 1] and the entries it points to are read, and each index is checked
    to lie in 0..minor - 1 before scipy sees it. `max_bytes` bounds the entries one block reads."""
    indptr = _checked_indptr(layout, lo, hi)
    start, stop = int(indptr[0]), int(indptr[-1])
    limit = base.MAX_ROW_GROUP_BYTES if max_bytes is None else max_bytes
    if (stop - start) * layout.entry_bytes > limit:
        raise InputError(f"{layout.where}: sparse matrix '{layout.group.name}' stores {stop - start} entries "
                         f"({(stop - start) * layout.entry_bytes} bytes) in {layout.kind} block {lo}:{hi}; at most "
                         f"{limit} a block (TENSORFLEET_MAX_ROW_GROUP_BYTES)")
    indices = np.asarray(layout.group["indices"][start:stop])
    data = np.asarray(layout.group["data"][start:stop])
    if len(indices) != stop - start or len(data) != stop - start:
        raise InputError(f"{layout.where}: sparse matrix '{layout.group.name}' ends before entry {stop}")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= layout.minor):
        bad = int(np.nonzero((indices < 0) | (indices >= layout.minor))[0][0])
        axis = "columns" if layout.kind == "csr" else "rows"
        raise InputError(f"{layout.where}: sparse matrix '{layout.group.name}' has index {int(indices[bad])} at entry "
                         f"{start + bad}, outside its {layout.minor} {axis}")
    if layout.kind == "csr":  # numpy alone (csr_rows.py): no scipy import for a CSR job
        return CsrRows(data, indices, indptr - start, layout.minor)
    import scipy.sparse  # here: an HDF5 job, which imports this module, needs no scipy

    count = hi - lo
    return scipy.sparse.csc_matrix((data, indices.astype(np.int64, copy=False), indptr - start), shape=(layout.minor, count))
