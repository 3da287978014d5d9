"""Every stage's own output (`output.stages`), and the output of a job whose last stage is a tool.

A stage's outputs are merged from its own parts, as the last stage's are: one file per stage
beside the job's output, `<output stem>.<stage><suffix>` (out/dpam.parquet ->
out/dpam.search.parquet), in the same format, in that stage's row order (the input's order, or
a fan-out's children: parent order, then k), with ok/error per row and the errors table. A
ragged output (a fan-out stage's entries, per-residue states) is stored flat with its offsets in
HDF5 (as output.ragged), and padded to its longest row elsewhere, beside its length output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine.job import JobFatal
from ..engine.manifest import Manifest
from ..engine.merge import MergeError, MergeInputs, merge
from ..engine.provenance import run_facts
from ..spec import OutputSpec
from ..spec.kinds import PipelineSpec
from .stage_graph import stage_ragged


def stage_output_path(output: Path, stage: str) -> Path:
    return output.with_name(f"{output.stem}.{stage}{output.suffix}")


def stage_output_spec(spec: PipelineSpec, index: int, path: Path) -> OutputSpec:
    """The job's output settings for one stage's own file (its own outputs, its ragged ones)."""
    ragged = stage_ragged(spec.stages[index]) if spec.output.format == "hdf5" else {}
    data = spec.output.model_dump(exclude={"stages"})
    data.update({"path": str(path), "tensors": {}, "ragged": ragged, "parts": None})
    return OutputSpec.model_validate(data)


def merge_stage(spec: PipelineSpec, index: int, stage_dir: Path, path: Path, limit: int | None,
                provenance: dict) -> tuple[Path, int, dict[str, tuple[list[int], str]]]:
    """Stage `index`'s committed parts into `path`: (path, rows failed, columns)."""
    manifest = Manifest.open_existing(stage_dir)
    if manifest is None:
        raise JobFatal(f"stage {spec.stages[index].name} has no manifest in {stage_dir}; run the job to compute it")
    try:
        made = {**provenance, **run_facts(manifest), "stage": spec.stages[index].name}
        inputs = MergeInputs(job_dir=stage_dir, output=stage_output_spec(spec, index, path), input_spec=spec.input,
                             provenance=made, limit=limit, final_path=path)
        try:
            result = merge(manifest, inputs)
        except (MergeError, ValueError, OSError) as error:
            raise JobFatal(f"stage {spec.stages[index].name}: merge of its own output failed: {error}") from None
        columns = {c.name: (list(c.row_shape), str(np.dtype(c.dtype))) for c in result.columns}
        return result.path, result.rows_failed, columns
    finally:
        manifest.close()


def write_stage_outputs(spec: PipelineSpec, dirs: list[Path], output: Path, limit: int | None,
                        provenance: dict) -> list[Path]:
    """The files of `output.stages`, each merged from its stage's parts (after every stage finished)."""
    names = [stage.name for stage in spec.stages]
    written = []
    for name in spec.output.stages:
        index = names.index(name)
        path = stage_output_path(output, name)
        written.append(merge_stage(spec, index, dirs[index], path, limit, provenance)[0])
    return written
