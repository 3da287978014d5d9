"""A tool stage's chunk, as files: the rows written for the tool, the tool run, its results read back.

The tool runs with an argv list (never a shell), in the chunk's scratch folder, with stdin
closed, a timeout (its whole process group is killed), and an environment without the
coordinator's secrets (any variable whose name says token, secret, password, credential or key).
"""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..spec.tool_stage import ToolReadSpec, ToolWriteSpec

#: Environment variables a tool never sees: the coordinator's tokens and any cloud or API secret.
SECRET_NAMES = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH", re.IGNORECASE)
#: How much of a failed tool's stderr its rows' error message keeps.
STDERR_TAIL = 2000
NUMPY_OF = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64, "BYTES": object}


class ToolFailed(Exception):
    """The tool did not produce a readable result for its chunk: every row of the chunk fails."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ChunkResult:
    """One chunk's outputs for its ok rows, and why the others failed (offset -> (code, message))."""

    ok: np.ndarray
    outputs: dict[str, np.ndarray]
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)


def tool_env() -> dict[str, str]:
    """The coordinator's environment without secrets (and without tensorfleet's own settings)."""
    return {name: value for name, value in os.environ.items()
            if not SECRET_NAMES.search(name) and not name.startswith("TENSORFLEET_")}


def _file_name_problem(name: str) -> str:
    if not name or name in (".", "..") or any(c in name for c in "/\\\0\n\r") or len(name.encode()) > 255:
        return f"id gives the file name '{name}', which cannot be one (no '/', '\\', NUL, newline; 1-255 bytes)"
    return ""


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise TypeError


def _text(value: object) -> str:
    """One TSV cell: text as it is, numbers in numpy's shortest round-trip form."""
    if isinstance(value, bytes | bytearray | memoryview | str):
        return _as_bytes(value).decode()
    return str(value)


def write_inputs(write: ToolWriteSpec, scratch: Path, ids: np.ndarray, values: dict[str, np.ndarray],
                 send: np.ndarray) -> tuple[Path, dict[int, tuple[str, str]]]:
    """Write the rows marked `send` for the tool; the {inputs} path and the rows refused (offset -> error)."""
    refused: dict[int, tuple[str, str]] = {}
    offsets = [int(i) for i in np.nonzero(send)[0]]
    if write.format == "files":
        folder = scratch / "inputs"
        folder.mkdir()
        (field_name,) = write.fields
        for offset in offsets:
            name = f"{ids[offset]}{write.suffix}"
            problem = _file_name_problem(name)
            if problem:
                refused[offset] = ("INVALID_ARGUMENT", problem)
                continue
            value = values[field_name][offset]
            with open(folder / name, "wb") as handle:
                if isinstance(value, bytes | bytearray | memoryview | str):
                    handle.write(_as_bytes(value))
                else:
                    np.save(handle, np.asarray(value), allow_pickle=False)
        return folder, refused
    path = scratch / write.file_name
    buffer = io.StringIO()
    if write.format == "fasta":
        (field_name,) = write.fields
        for offset in offsets:
            row_id, value = str(ids[offset]), values[field_name][offset]
            try:
                sequence = _as_bytes(value).decode()
            except (TypeError, UnicodeDecodeError):
                refused[offset] = ("INVALID_ARGUMENT", f"field '{field_name}' is not text; FASTA holds sequences")
                continue
            if not row_id or any(c.isspace() for c in row_id) or ">" in sequence or "\n" in sequence:
                refused[offset] = ("INVALID_ARGUMENT", "a FASTA record needs an id without spaces and a one-line sequence")
                continue
            buffer.write(f">{row_id}\n{sequence}\n")
    else:
        columns = ["id"]
        for name in write.fields:
            sample = values[name]
            width = int(np.prod(sample.shape[1:])) if sample.ndim > 1 else 0
            columns += [f"{name.partition(':')[2] or name}_{i}" for i in range(width)] if width else [name.partition(":")[2] or name]
        buffer.write("\t".join(columns) + "\n")
        for offset in offsets:
            cells = [str(ids[offset])]
            for name in write.fields:
                value = values[name][offset]
                cells += [_text(v) for v in np.asarray(value).reshape(-1)] if np.ndim(value) else [_text(value)]
            if any("\t" in cell or "\n" in cell for cell in cells):
                refused[offset] = ("INVALID_ARGUMENT", "a value holds a tab or newline, which a TSV cell cannot")
                continue
            buffer.write("\t".join(cells) + "\n")
    path.write_text(buffer.getvalue())
    return path, refused


def argv_for(command: list[str], places: dict[str, str]) -> list[str]:
    out = []
    for argument in command:
        for key, value in places.items():
            argument = argument.replace(key, value)
        out.append(argument)
    return out


def run_tool(argv: list[str], scratch: Path, timeout_s: float, running: set[int] | None = None) -> None:
    """Run the tool in `scratch`; ToolFailed on a non-zero exit (with its stderr's tail) or a timeout.
    `running` holds the live process groups, for the caller to kill when the job is interrupted."""
    with open(scratch / "tool.stdout", "wb") as out, open(scratch / "tool.stderr", "wb") as err:
        try:
            process = subprocess.Popen(argv, cwd=scratch, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                       env=tool_env(), start_new_session=True, close_fds=True)
        except OSError as error:
            raise ToolFailed("FAILED_PRECONDITION", f"cannot start {argv[0]}: {error}") from None
        if running is not None:
            running.add(process.pid)
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(process.pid)
            process.wait()
            raise ToolFailed("DEADLINE_EXCEEDED", f"{Path(argv[0]).name} ran past timeout_s {timeout_s:g}s; "
                             f"killed{_tail(scratch)}") from None
        finally:
            if running is not None:
                running.discard(process.pid)
    if code != 0:
        why = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        raise ToolFailed("TOOL_FAILED", f"{Path(argv[0]).name} {why}{_tail(scratch)}")


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(scratch: Path) -> str:
    try:
        data = (scratch / "tool.stderr").read_bytes()[-STDERR_TAIL:]
    except OSError:
        return ""
    text = data.decode(errors="replace").strip()
    return f"; stderr ends: {text}" if text else "; stderr was empty"


# --- the results --------------------------------------------------------------------------------
def read_results(read: ToolReadSpec, outputs: Path, ids: list[str]) -> dict[str, list[dict[str, object]]]:
    """The tool's result rows by id, in the file's order; ToolFailed when the file is missing or unreadable."""
    if read.format == "npy":
        (output,) = read.outputs
        found: dict[str, list[dict[str, object]]] = {}
        for row_id in ids:
            path = outputs / read.name.replace("{id}", row_id)
            if path.parent != outputs or not path.is_file():
                continue
            try:
                found[row_id] = [{output: np.load(path, allow_pickle=False)}]
            except (OSError, ValueError) as error:
                raise ToolFailed("DATA_LOSS", f"{path.name}: not a readable .npy file ({error})") from None
        return found
    path = outputs / read.name
    if not path.is_file():
        listing = sorted(p.name for p in outputs.iterdir())[:10]
        raise ToolFailed("NOT_FOUND", f"the tool wrote no {read.name} in {{outputs}} (it holds {listing})")
    try:
        records = _table(read, path)
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as error:
        raise ToolFailed("DATA_LOSS", f"{read.name}: cannot read it as {read.format}: {error}") from None
    found = {}
    for record in records:
        if read.id_column not in record:
            raise ToolFailed("DATA_LOSS", f"{read.name}: no column '{read.id_column}' (read.id_column); "
                             f"it has {sorted(record)}")
        found.setdefault(str(record[read.id_column]), []).append(record)
    return found


def _table(read: ToolReadSpec, path: Path) -> list[dict[str, object]]:
    if read.format == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    delimiter = "\t" if read.format == "tsv" else ","
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle, delimiter=delimiter) if row and not row[0].startswith("#")]
    names = read.columns if not read.header else (rows.pop(0) if rows else [])
    if read.header and read.columns:
        names = read.columns
    return [dict(zip(names, row, strict=False)) for row in rows]


def _value(read: ToolReadSpec, output: str, record: dict[str, object], declared: tuple[str, list[int]]) -> np.ndarray:
    """One result row's value of `output`, as its declared datatype and shape; ValueError if it is not."""
    datatype, shape = declared
    source = read.outputs[output]
    if read.format == "npy":
        value = np.asarray(record[output])
        if datatype == "BYTES" or value.dtype.kind not in "biuf":
            raise ValueError(f"{output}: the .npy file holds {value.dtype}, not numbers")
    else:
        names = source if isinstance(source, list) else [source]
        missing = [name for name in names if name not in record]
        if missing:
            raise ValueError(f"the result row has no column {missing}")
        cells = [record[name] for name in names]
        if datatype == "BYTES":
            return np.array(_as_bytes(cells[0]) if isinstance(cells[0], str | bytes) else str(cells[0]).encode(), dtype=object)
        if not isinstance(source, list) and isinstance(cells[0], list | tuple):
            cells = list(cells[0])  # a parquet list cell: the vector itself
        try:
            value = np.array([float(c) if isinstance(c, str) else c for c in cells], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{output}: {cells[:4]} are not numbers") from None
        if not isinstance(source, list) and not shape:
            value = value.reshape(())
    if datatype.startswith("INT") and not np.all(np.mod(value, 1) == 0):
        raise ValueError(f"{output}: {value.reshape(-1)[:4].tolist()} are not integers")
    if list(value.shape) != [d for d in shape] and not any(d == -1 for d in shape):
        raise ValueError(f"{output}: shape {list(value.shape)}, declared {shape}")
    return value.astype(NUMPY_OF[datatype])


def assemble(read: ToolReadSpec, declared: dict[str, tuple[str, list[int]]], ids: np.ndarray, send: np.ndarray,
             results: dict[str, list[dict[str, object]]], fan_out: str | None) -> ChunkResult:
    """The chunk's outputs from the tool's results: a row the results lack, or hold badly, fails alone."""
    errors: dict[int, tuple[str, str]] = {}
    per_row: dict[int, list[dict[str, np.ndarray]]] = {}
    per_child = {name: (declared[name][0], declared[name][1][1:] if fan_out else declared[name][1]) for name in read.outputs}
    for offset in np.nonzero(send)[0]:
        offset = int(offset)
        records = results.get(str(ids[offset]), [])
        if not records and not fan_out:
            errors[offset] = ("NOT_FOUND", f"the tool's {read.name} has no result for id '{ids[offset]}'")
            continue
        if len(records) > 1 and not fan_out:
            errors[offset] = ("INVALID_ARGUMENT", f"the tool's {read.name} has {len(records)} results for id "
                              f"'{ids[offset]}'; a stage with several rows per input row sets fan_out")
            continue
        try:
            per_row[offset] = [{name: _value(read, name, record, per_child[name]) for name in read.outputs}
                               for record in records]
        except ValueError as error:
            errors[offset] = ("INVALID_ARGUMENT", f"the tool's {read.name}, id '{ids[offset]}': {error}")
    ok = np.zeros(len(ids), dtype=bool)
    ok[list(per_row)] = True
    order = sorted(per_row)
    outputs: dict[str, np.ndarray] = {}
    for name, (datatype, shape) in declared.items():
        if fan_out and name == f"{fan_out}_count":
            outputs[name] = np.array([len(per_row[o]) for o in order], dtype=np.int32)
            continue
        if name not in read.outputs:
            continue
        if fan_out:
            widest = max((len(per_row[o]) for o in order), default=1) or 1  # a part holds no zero-size array
            inner = shape[1:]
            values = np.zeros((len(order), widest, *inner), dtype=NUMPY_OF[datatype])
            if datatype == "BYTES":
                values[...] = b""
            for row, offset in enumerate(order):
                for k, child in enumerate(per_row[offset]):
                    values[row, k] = child[name]
        else:
            values = np.zeros((len(order), *shape), dtype=NUMPY_OF[datatype])
            if datatype == "BYTES":
                values[...] = b""
            for row, offset in enumerate(order):
                values[row] = per_row[offset][0][name]
        outputs[name] = values
    if not ok.any():  # as a model stage's: a part in which no row succeeded stores no outputs
        outputs = {}
    return ChunkResult(ok, outputs, errors)
