"""What `tensorfleet status PATH` reads: PATH may be the job folder, the job file, or the output.

People reach for the file they know: the job file they ran, or the output it wrote. Both lead
to one job folder (the job's `job_dir`, else `<output>.tfjob` beside the output), so status
maps them there instead of failing on a file where it wanted a folder.
"""

from __future__ import annotations

from pathlib import Path

from ..engine.run_types import RunOptions
from ..spec.errors import JobFatal

#: Suffixes of job files (YAML or JSON): a file with one of these is read as a job.
JOB_FILE_SUFFIXES = (".yaml", ".yml", ".json")
#: The folder a plain job's output gets by default (engine/run_types.default_job_dir).
JOB_DIR_SUFFIX = ".tfjob"


def status_folder(path: Path) -> Path:
    """The job folder `path` stands for: itself if a folder, the job file's folder, or the
    folder beside an output. JobFatal saying what to pass when it is none of them."""
    if path.is_dir():
        return path
    if path.suffix.lower() in JOB_FILE_SUFFIXES and path.is_file():
        return _job_file_folder(path)
    beside = path.with_name(path.name + JOB_DIR_SUFFIX)
    if beside.is_dir():
        return beside
    if path.exists():
        raise JobFatal(
            f"{path} is a file, not a job folder, and no job folder {beside.name} lies beside it: pass the job "
            "folder (its job_dir, by default <output>.tfjob), or the job file"
        )
    raise JobFatal(f"{path} does not exist: pass a job folder (by default <output>.tfjob), the job file, or the output")


def _job_file_folder(path: Path) -> Path:
    from . import api

    try:
        spec = api.load(path)
    except JobFatal as error:
        raise JobFatal(f"{path} is not a job file tensorfleet can read ({error}); pass the job folder instead") from None
    return api.locations(spec, RunOptions())[1]
