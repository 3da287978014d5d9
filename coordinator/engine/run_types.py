"""What a run is given and what its phases hand each other (coordinator/engine/job.py runs them).

    RunContext ──settings──▶ Adapted + PlanSettings ──plan | resume check──▶ Planned
               ──fleet──▶ Serving ──dispatch──▶ Dispatched ──merge──▶ RunResult

Every hand-off is frozen and carries only what the next phase reads; nothing is rewritten after
it is made. RunOptions and RunResult are the command line's and the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from ..fleet.model_fleet import ModelFleet
from ..fleet.model_info import ModelInfo
from ..io.readers import Reader
from ..spec import JobSpec
from .adapt import InputReport
from .manifest import MANIFEST_NAME
from .planner import Plan
from .progress import Progress
from .shard_plan import ShardRole

#: A prompt put once per stream: (context id, tensors).
Context = tuple[str, dict[str, np.ndarray]]


@dataclass
class RunOptions:
    """What a command line asks of a run (the same for every job kind)."""

    job_dir: Path | None = None
    resume: bool = False
    restart: bool = False
    dry_run: bool = False
    limit: int | None = None
    servers: list[str] | None = None
    progress_stream: TextIO | None = None
    #: models x sources jobs: run only these models (None: all).
    models: list[str] | None = None
    #: With resume: the committed chunks holding failed rows are computed again.
    retry_failed: bool = False
    #: `--shard I/N`: this run computes one contiguous slice of the plan (engine/shard_plan.py).
    shard: ShardRole | None = None


@dataclass
class RunResult:
    output: Path | None
    job_dir: Path
    rows: int
    rows_failed: int
    rows_computed: int
    seconds: float
    columns: dict[str, tuple[list[int], str]] = field(default_factory=dict)
    servers: list[str] = field(default_factory=list)
    plan_text: str = ""
    #: Object-store URLs the output was uploaded to.
    uploaded: list[str] = field(default_factory=list)
    #: What was done to fit the input to the model (alignment, truncation, duplicate ids).
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.rows_failed else 0

    @property
    def rows_per_second(self) -> float:
        return self.rows_computed / self.seconds if self.seconds > 0 else 0.0

    def speed_line(self, where: str = "") -> str:
        """What this run computed; a re-run of a finished job says so instead of `0 rows in 0.0s`."""
        if not self.rows_computed:
            return "nothing computed: every chunk was already done (--restart computes them again)"
        return (f"speed: {self.rows_computed} rows computed in {self.seconds:.1f}s = {self.rows_per_second:.1f} rows/s"
                + where)

    def plan_lines(self, *more: str) -> list[str]:
        """A dry run's size lines (rows, requests, chunks) and those starting with `more`: what
        a dry run of many parts (files, sources, stages) quotes for each."""
        wanted = ("rows:", "requests:", "chunks:", *more)
        return [line for line in self.plan_text.splitlines() if line.startswith(wanted)]

    def summary(self) -> str:
        if self.output is None:
            return self.plan_text
        dims = ", ".join(f"{name} {shape} {dtype}" for name, (shape, dtype) in self.columns.items())
        lines = [
            f"output: {self.output}",
            f"rows: {self.rows} ({self.rows - self.rows_failed} ok, {self.rows_failed} failed)",
            f"outputs: {dims}",
            self.speed_line(f" on {len(self.servers)} server(s)"),
            f"job folder: {self.job_dir}",
        ]
        lines += [f"uploaded: {url}" for url in self.uploaded]
        lines += self.notes
        if self.rows_failed:
            lines.append(f"failed rows: see the errors table in {self.output} ({self.job_dir / MANIFEST_NAME})")
        return "\n".join(lines)


def final_output_path(spec: JobSpec, limit: int | None) -> Path:
    path = Path(spec.output.path)
    return path.with_name(f"{path.stem}.limit{limit}{path.suffix}") if limit else path


def default_job_dir(spec: JobSpec, output: Path) -> Path:
    return Path(spec.job_dir) if spec.job_dir else output.with_name(output.name + ".tfjob")


@dataclass(frozen=True)
class StageHooks:
    """How a workflow kind uses one run: multi-stage jobs merge only the last stage and carry
    earlier stages' failed rows along; in-context jobs put a prompt once per stream."""

    merge_output: bool = True
    wrap_commit: Callable | None = None
    #: A prompt put once per stream; or a function of the model's description that makes it (a
    #: prompt aligned to the model's genes), called once by the settings phase (Adapted.context).
    context: Context | Callable[[ModelInfo, InputReport], Context] | None = None
    #: More provenance for the merged output (a multi-stage job's earlier stages), asked at the merge.
    provenance: Callable[[], dict] | None = None


@dataclass(frozen=True)
class RunContext:
    """What a workflow hands the engine for one run: the inputs of every phase, fixed."""

    spec: JobSpec
    reader: Reader
    options: RunOptions
    output: Path
    job_dir: Path
    fleet: ModelFleet
    hooks: StageHooks = field(default_factory=StageHooks)
    #: What the plan reads instead of `reader` (a later stage plans against the earlier models'
    #: declared outputs, so it plans, and starts its servers, without waiting for them).
    plan_reader: Reader | None = None

    @property
    def status_path(self) -> Path:
        return self.job_dir / "status.json"


# --- the hand-offs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Adapted:
    """The readers fitted to the model once (duplicate ids, over-length rows, gene alignment)."""

    reader: Reader
    #: The adapted plan reader (None: the plan reads `reader`).
    plan_reader: Reader | None
    report: InputReport
    #: The prompt put once per stream (StageHooks.context, made for this model).
    context: Context | None

    @property
    def planned_from(self) -> Reader:
        return self.plan_reader or self.reader


@dataclass(frozen=True)
class Planned:
    """The plan (a fresh run) or the checked resume: what the fleet and dispatch phases need."""

    #: A fresh run's plan, recorded in a new manifest once the servers serve; None on a resume.
    plan: Plan | None
    fields: Mapping[str, str]
    #: None only for a resume of finished, unchanged work (no model was asked).
    adapted: Adapted | None
    #: Chunks remain: servers are started.
    pending: bool


@dataclass(frozen=True)
class Serving:
    """The started fleet and the served model, checked against the input again."""

    servers: tuple[str, ...]
    info: ModelInfo
    #: address -> time.monotonic() when the fleet check found it serving.
    verified: Mapping[str, float]
    fields: Mapping[str, str]
    adapted: Adapted


@dataclass(frozen=True)
class Dispatched:
    """The pending chunks, committed."""

    #: Still open: the merge ticks and closes it (None when nothing was pending).
    progress: Progress | None
    rows_computed: int
    seconds: float
