"""Which slice of a job's plan a shard computes (`tensorfleet run JOB --shard I/N`).

Every shard makes the job's whole plan, deterministically (planner.py: the same input and
settings always give the same chunks and requests), and keeps the chunks of its own contiguous
row range. Nothing about the plan is shared between shards, so N coordinators on a shared
filesystem never write the same file: each has its own folder, manifest, parts and lock.

A shard's rows start and stop on chunk edges, so its chunks and requests are the one-coordinator
run's exactly, and its outputs are bitwise the same. A multi-stage job's stages cut chunks of
different sizes (a 128-row batch stage over 64-row chunks makes 128-row chunks), so its shards
cut at multiples of every stage's chunk size (`unit`), and each stage's slice holds the rows
the earlier stage's slice computed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..fleet.model_info import ModelInfo
from ..spec.errors import JobFatal
from .planner import Plan

#: The shards' folders, under the job folder: shards/I-of-N/ (each an ordinary job folder).
SHARDS_DIR = "shards"
#: In the job folder: {"count": N}; written by every shard, the same bytes, atomically.
MARKER_NAME = "shards.json"
#: In a shard's run folder: its rows and the model's description (the merge reads it instead
#: of asking servers that are gone by then).
SHARD_RECORD = "shard.json"


@dataclass(frozen=True)
class ShardRole:
    """This coordinator's part of a sharded job: shard `index` (0-based) of `count`."""

    index: int
    count: int
    #: The job's (top) folder; set by the engine's entry point (workflows/sharded.py).
    top: Path | None = None
    #: Shard edges are multiples of this many rows (a pipeline: the lcm of its stages' chunk
    #: sizes); None: the run's own chunk size.
    unit: int | None = None
    #: `tensorfleet merge`: every shard is complete, nothing is computed.
    merge_only: bool = False
    #: The pass that writes what a workflow combines from its merged runs (a sweep's sheets, an
    #: in-context job's one .h5ad): run once every shard is complete (workflows/sharded.py).
    final: bool = False

    @property
    def label(self) -> str:
        return f"shard {self.index}/{self.count}"

    @property
    def folder(self) -> Path:
        assert self.top is not None
        return shard_folder(self.top, self.index, self.count)


def parse_shard(text: str) -> ShardRole:
    """`I/N` (0 <= I < N, as $SLURM_ARRAY_TASK_ID and $JOB_COMPLETION_INDEX count)."""
    index, slash, count = text.partition("/")
    try:
        role = ShardRole(int(index), int(count))
    except ValueError:
        raise JobFatal(f"--shard {text!r}: write I/N, e.g. 0/3 (shard I of N, counted from 0)") from None
    if not slash or role.count < 1 or not 0 <= role.index < role.count:
        raise JobFatal(f"--shard {text!r}: I must be 0 to N-1 and N at least 1 (e.g. 0/3, 1/3, 2/3)")
    return role


def shard_count(top: Path) -> int | None:
    """N when `top` holds a sharded job (its shards.json), else None."""
    try:
        return int(json.loads((top / MARKER_NAME).read_text())["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shard_folder(top: Path, index: int, count: int) -> Path:
    return top / SHARDS_DIR / f"{index}-of-{count}"


def chunk_unit(batch_rows: int, token_budget: int | None, chunk_rows: int) -> int:
    """Rows of every chunk but the last, as planner.make_plan cuts them: chunk_rows under a token
    budget (length_sorted_chunks), else whole requests up to chunk_rows (make_chunks)."""
    if token_budget:
        return chunk_rows
    return -(-chunk_rows // batch_rows) * batch_rows


def common_unit(units: list[int]) -> int:
    """The smallest row count every unit divides: a cut there is a chunk edge of every stage."""
    return math.lcm(*units) if units else 1


def shard_rows(rows: int, unit: int, index: int, count: int) -> tuple[int, int]:
    """Shard `index`'s rows [start, stop): whole units, as even as they divide; a shard may be
    empty when the job has fewer units than shards."""
    units = -(-rows // unit)

    def cut(i: int) -> int:
        return min(rows, unit * (i * units // count))

    return cut(index), cut(index + 1)


def slice_plan(plan: Plan, role: ShardRole) -> Plan:
    """The plan's chunks of this shard (global indexes and rows kept; ids digest of the whole job,
    which the merge checks over every shard's parts)."""
    settings = plan.settings
    unit = role.unit or chunk_unit(settings.batch_rows, settings.token_budget, settings.chunk_rows)
    start, stop = shard_rows(settings.rows, unit, role.index, role.count)
    chunks = [chunk for chunk in plan.chunks if start <= chunk.start < stop]
    if (chunks and (chunks[0].start != start or chunks[-1].stop != stop)) or (not chunks and start != stop):
        raise JobFatal(
            f"{role.label}: the plan's chunks do not end at row {start} or {stop}, where the shard's rows do "
            f"(chunks of {unit} rows were expected); set chunking.chunk_rows to a multiple of every "
            f"batch_rows, or run the job without --shard"
        )
    return replace(plan, chunks=chunks)


def write_record(run_dir: Path, role: ShardRole, plan: Plan, info: ModelInfo) -> None:
    """What the merge needs of this shard's run beside its manifest: the model's description."""
    rows = [plan.chunks[0].start, plan.chunks[-1].stop] if plan.chunks else []
    record = {"index": role.index, "count": role.count, "rows": rows, "model_info": _info_json(info)}
    write_json_once(run_dir / SHARD_RECORD, record)


def recorded_info(run_dir: Path) -> ModelInfo | None:
    """The model's description this shard's run recorded (None: none recorded)."""
    try:
        data = json.loads((run_dir / SHARD_RECORD).read_text())["model_info"]
    except (OSError, ValueError, KeyError):
        return None
    data["optional_inputs"] = set(data.get("optional_inputs", []))
    data["sparse_inputs"] = set(data.get("sparse_inputs", []))
    data["inputs"] = {k: (v[0], list(v[1])) for k, v in data["inputs"].items()}
    data["outputs"] = {k: (v[0], list(v[1])) for k, v in data["outputs"].items()}
    return ModelInfo(**data)


def _info_json(info: ModelInfo) -> dict:
    data = asdict(info)
    data["optional_inputs"] = sorted(info.optional_inputs)
    data["sparse_inputs"] = sorted(info.sparse_inputs)
    return data


def write_json_once(path: Path, data: dict) -> None:
    """Atomic, through a temp file of this process's own: shards writing the same file at once
    (the job folder's marker) never meet in a half-written one."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(temp, path)
