"""The merge: committed part files, in input order, into one output file, checked and atomic.

It checks that the parts hold exactly the planned rows and that their ids, in order, are
the input's ids (by digest), so every id appears exactly once. Memory is one chunk at a time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io.crashpoints import crash_point
from ..io.output_files import OutputFolder
from ..io.part_store import open_part
from ..io.writers import Column, Ragged, WriteContext, open_writer
from ..io.writers.base import writer_class
from ..spec import InputSpec, OutputSpec
from .manifest import Manifest
from .planner import Chunk, IdsDigest


class MergeError(Exception):
    """The parts do not add up to the planned output; nothing was written."""


@dataclass
class MergeResult:
    path: Path
    rows: int
    rows_failed: int
    columns: list[Column]
    side_files: list[Path]


def temp_path_for(final: Path) -> Path:
    return final.with_name(f".{final.stem}.partial{final.suffix}")


def _columns(
    job_dir: Path, manifest: Manifest, chunks: list[Chunk], output: OutputSpec, declared: dict[str, tuple[str, tuple[int, ...]]]
) -> list[Column]:
    """Stored columns: names from the spec, dtype and row shape from the first part with rows."""
    found: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for chunk in chunks:
        with open_part(job_dir, manifest.part_of(chunk.index), verify=False) as part:
            if part.array("ok").any():
                for name in part.names:
                    if name != "ok":
                        array = part.array(name)
                        found[name] = (array.dtype, tuple(array.shape[1:]))
                break
    _widen_ragged(job_dir, manifest, chunks, found, declared)
    if not found:  # every row failed: fall back on what the model declares
        from tensorfleet.core.codec import NUMPY_DTYPES

        for name, (datatype, shape) in declared.items():
            found[name] = (NUMPY_DTYPES.get(datatype, np.dtype("<f4")), tuple(max(d, 0) for d in shape))
    wanted = output.tensors or {name: name for name in sorted(found)}
    for source, lengths in output.ragged.items():
        if source not in wanted or lengths not in found:
            raise MergeError(
                f"output.ragged maps '{source}' -> '{lengths}'; both must be model outputs (it returns: "
                f"{sorted(found)}) and '{source}' must be stored (output.tensors)"
            )
        if len(found[source][1]) < 1 or found[lengths][0].kind not in "iu":
            raise MergeError(f"output.ragged: '{source}' needs a length axis and '{lengths}' integer lengths")
    columns = []
    for source, stored in wanted.items():
        if source not in found:
            raise MergeError(f"output.tensors names '{source}', which the model does not return (it returns: {sorted(found)})")
        dtype, shape = found[source]
        if output.dtype and dtype.kind == "f":
            dtype = np.dtype(output.dtype)
        lengths = output.ragged.get(source)
        columns.append(Column(stored, source, dtype, shape[1:] if lengths else shape, lengths))
    return columns


def _widen_ragged(job_dir: Path, manifest: Manifest, chunks: list[Chunk], found: dict, declared: dict) -> None:
    """A declared ragged output (a -1 dimension) is as wide as each chunk's longest row: stored
    unflattened, it takes the widest of every part (narrower chunks are zero-padded)."""
    ragged = [name for name, (_, shape) in declared.items() if -1 in shape and name in found]
    if not ragged:
        return
    for chunk in chunks:
        with open_part(job_dir, manifest.part_of(chunk.index), verify=False) as part:
            for name in ragged:
                if name in part.names:
                    dtype, shape = found[name]
                    have = part.array(name).shape[1:]
                    if len(have) == len(shape):
                        found[name] = (dtype, tuple(max(a, b) for a, b in zip(shape, have, strict=True)))


def _padded(values: np.ndarray, row_shape: tuple[int, ...]) -> np.ndarray:
    """A chunk's rows of a ragged output, zero-padded to the stored row shape."""
    if values.shape[1:] == tuple(row_shape) or values.ndim != len(row_shape) + 1:
        return values
    return np.pad(values, [(0, 0)] + [(0, want - have) for want, have in zip(row_shape, values.shape[1:], strict=True)])


def _ragged(values: np.ndarray, lengths: np.ndarray, ok: np.ndarray, column: Column, chunk: Chunk) -> Ragged:
    """One chunk of a ragged output: padded [ok rows, width, ...] -> entries back to back, in row order."""
    lengths = np.asarray(lengths).reshape(len(values), -1)[:, 0].astype(np.int64)
    width = values.shape[1] if values.ndim > 1 else 0
    if len(lengths) and (lengths.min() < 0 or lengths.max() > width):
        raise MergeError(
            f"chunk {chunk.index}: '{column.lengths_from}' holds lengths outside 0..{width}, the width of "
            f"'{column.source}'; check output.ragged"
        )
    keep = np.arange(width)[None, :] < lengths[:, None]
    full = np.zeros(chunk.rows, dtype=np.int64)
    full[ok] = lengths
    return Ragged(np.asarray(values[keep], dtype=column.dtype), full)


def _output_of(part: Any, name: str, ok: np.ndarray, column: Column, lengths: bool = False) -> np.ndarray:
    """An output's values for a part's ok rows. A part in which no row succeeded stores no
    outputs at all (the model never ran on it): its values are then empty."""
    if name in part.names or ok.any():
        return part.array(name)
    if lengths:
        return np.zeros(0, dtype=np.int64)
    return np.zeros((0, 0, *column.row_shape) if column.lengths_from else (0, *column.row_shape), dtype=column.dtype)


@dataclass(frozen=True)
class MergeInputs:
    """What the merge needs beside the manifest (which holds the chunks, rows, ids digest and the
    model's declared outputs)."""

    job_dir: Path
    output: OutputSpec
    input_spec: InputSpec
    provenance: dict[str, Any]
    limit: int | None
    final_path: Path
    #: Per-row fields the input view adds (e.g. `truncated`), read for each chunk's rows with
    #: `input_values(start, stop)` and stored after the model's outputs.
    input_columns: tuple[Column, ...] = ()
    input_values: Callable[[int, int], dict[str, np.ndarray]] | None = None
    #: How many of input_columns (the first ones: output.keep_input) go before the model's outputs.
    leading: int = 0


def _chunk_arrays(
    part: Any, chunk: Chunk, ok: np.ndarray, columns: list[Column], from_input: set[str], inputs: MergeInputs
) -> dict[str, Any]:
    """One chunk's stored columns: the model's outputs for its ok rows (NaN, zero or b"" elsewhere),
    ragged ones packed, and the input view's columns."""
    arrays = inputs.input_values(chunk.start, chunk.stop) if inputs.input_values and from_input else {}
    for column in columns:
        if column.name in from_input:
            continue
        values = _output_of(part, column.source, ok, column)
        if column.lengths_from:
            lengths = _output_of(part, column.lengths_from, ok, column, lengths=True)
            arrays[column.name] = _ragged(values, lengths, ok, column, chunk)
            continue
        if values.shape == (chunk.rows, *column.row_shape) and ok.all():  # every row ok: no copy to fill in
            arrays[column.name] = np.asarray(values, dtype=column.dtype)
            del values
            continue
        full = np.zeros((chunk.rows, *column.row_shape), dtype=column.dtype)
        if column.dtype.kind == "f":
            full[~ok] = np.nan
        elif column.dtype.hasobject:  # BYTES: a failed row holds b"", not the integer 0
            full[...] = b""
        full[ok] = _padded(values, column.row_shape)
        arrays[column.name] = full
        del values
    return arrays


def _place(folder: OutputFolder, temp: Path, side_files: list[Path], final_path: Path,
           output: OutputSpec) -> list[Path]:
    """fsync, then rename the side files and the output to their final names (through the folder
    held open, output_files.py); the side files."""
    for path in [temp, *side_files]:
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    finals = []
    for side in side_files:
        target = final_path.with_name(side.name.replace(temp.stem, final_path.stem, 1).lstrip("."))
        folder.replace(side.name, target.name)
        finals.append(target)
    kind = writer_class(output.format)
    for stale in getattr(kind, "side_files", lambda _: [])(final_path):
        if stale not in finals:
            folder.unlink_owned(stale.name)
    folder.replace(temp.name, final_path.name)
    folder.fsync()
    return finals


def merge(manifest: Manifest, inputs: MergeInputs) -> MergeResult:
    """The committed parts of `manifest`'s plan, in input order, into inputs.final_path."""
    chunks = manifest.chunks()
    rows = manifest.counts()["rows"]
    declared = {k: (v[0], tuple(v[1])) for k, v in (manifest.meta("outputs") or {}).items()}
    done = manifest.done_chunks()
    missing = [chunk.index for chunk in chunks if chunk.index not in done]
    if missing:
        raise MergeError(f"{len(missing)} chunks are not done (first: {missing[:5]})")
    covered = sum(chunk.rows for chunk in chunks)
    if covered != rows or any(a.stop != b.start for a, b in zip(chunks, chunks[1:], strict=False)):
        raise MergeError(f"the chunks cover {covered} rows, not the planned {rows} in one run")
    lead, trail = inputs.input_columns[: inputs.leading], inputs.input_columns[inputs.leading :]
    columns = [*lead, *_columns(inputs.job_dir, manifest, chunks, inputs.output, declared), *trail]
    # the folder is checked and held open now: everything below writes through it (output_files.py)
    with OutputFolder(inputs.final_path.parent) as folder:
        folder.check_replaceable(inputs.final_path.name)  # before any work: never replace a file we did not write
        return _merge_into(folder, manifest, inputs, chunks, rows, columns)


def _merge_into(folder: OutputFolder, manifest: Manifest, inputs: MergeInputs, chunks: list[Chunk], rows: int,
                columns: list[Column]) -> MergeResult:
    job_dir, final_path = inputs.job_dir, inputs.final_path
    errors = manifest.errors()
    from_input = {column.name for column in inputs.input_columns}
    temp = folder.at(temp_path_for(final_path).name)
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    context = WriteContext(
        spec=inputs.output, input=inputs.input_spec, temp_path=temp, columns=columns, rows=rows,
        provenance={**inputs.provenance, "rows": rows, "rows_failed": len(errors)}, errors=errors, limit=inputs.limit,
    )
    writer = open_writer(context)
    digest = IdsDigest()
    error_by_row = {e.row: f"{e.code}: {e.message}" for e in errors}
    try:
        for chunk in chunks:
            with open_part(job_dir, manifest.part_of(chunk.index)) as part:
                ids = part.encoded_strings("ids")  # kept as bytes: digested and compared without a str per row
                ok = np.array(part.array("ok"), dtype=bool)
                if len(ids) != chunk.rows or len(ok) != chunk.rows:
                    raise MergeError(f"chunk {chunk.index} holds {len(ids)} rows, planned {chunk.rows}")
                digest.add_encoded(ids)
                arrays = _chunk_arrays(part, chunk, ok, columns, from_input, inputs)
                error = np.full(chunk.rows, "", dtype=object)
                for offset in np.nonzero(~ok)[0]:
                    error[offset] = error_by_row.get(chunk.start + int(offset), "UNKNOWN: no error recorded")
                writer.write_encoded(chunk.start, ids, arrays, ok, error)
                del arrays, ok
                crash_point("merge")
        if digest.hexdigest() != manifest.plan_settings()["ids_digest"]:
            raise MergeError("the ids in the parts differ from the input's ids; rerun with --restart")
        side_files = writer.finish()
    except BaseException:
        writer.abort()
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    finals = _place(folder, temp, side_files, final_path, inputs.output)
    return MergeResult(final_path, rows, len(errors), columns, finals)
