"""`tensorfleet slurm JOB --gpus G --shards N`: one job as a SLURM job array plus a merge job.

Array task I (of 0..N-1) is the batch script of slurm.py for shard I: its own G servers, its own
run folder, and `tensorfleet run JOB --shard I/N` on them, in the job's one job folder (a shared
filesystem). The last task to finish merges; the merge job (`--dependency=afterok:<array>`)
runs `tensorfleet merge JOB` once every task succeeded, which then only confirms the output
(or writes it, if the last shard was stopped during its merge). A task that failed or was
cancelled is submitted again on its own (`sbatch --array=I submit-array.sbatch`): its shard
continues from its committed chunks and merges when it finishes last. The merge job of the
first submission is cancelled by SLURM then (`--kill-on-invalid-dep=yes`: its dependency can
no longer be met).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tensorfleet.core.exit_codes import EXIT_OK

from .sbatch_script import placement_options, sbatch_option, script_header, write_script
from .slurm_steps import SlurmError

#: The placeholder a dry run shows for the array's job id (sbatch gives it at submission).
ARRAY_ID = "<array job id>"


def render_merge_script(array_script: str, shards: int, after: str = ARRAY_ID, *, partition: str | None = None,
                        account: str | None = None, time: str | None = None) -> str:
    """The merge job for the array `array_script` (slurm.render_batch_script with shards): the same
    job file and python, one task, after every array task succeeded."""
    lines = array_script.splitlines()
    pick = {prefix: next((line for line in lines if line.startswith(prefix)), "") for prefix in ("PYTHON=(", "JOB=")}
    name, output = sbatch_option(array_script, "job-name"), sbatch_option(array_script, "output")
    if not (all(pick.values()) and name and output):
        raise SlurmError("the array script lacks its job name, output, python or job lines")
    sbatch = [f"--job-name={name}-merge", "--ntasks=1", f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes",
              f"--output={Path(output).parent}/slurm-merge-%j.out", *placement_options(partition, account, time)]
    return "\n".join([
        *script_header([
            f"Written by `tensorfleet slurm --shards {shards}`: the merge of the job's {shards} shards into its one",
            "output, once every array task succeeded (the last shard to finish has usually merged: this",
            "then confirms the output). Submitted with the array; on its own: sbatch --dependency=afterok:ID THIS_FILE",
        ], sbatch),
        pick["PYTHON=("],
        pick["JOB="],
        "export PYTHONUNBUFFERED=1",
        '"${PYTHON[@]}" -m tensorfleet.coordinator merge "$JOB"',
        "status=$?",
        'echo "tensorfleet: merge finished with exit code $status"',
        "exit $status",
        "",
    ])


def submit_sharded(args: argparse.Namespace, array_script: str, submit, script_dir) -> int:
    """Print both scripts (--dry-run), or submit the array, then the merge job after it."""
    merge_options = {"partition": args.partition, "account": args.account, "time": args.time}
    if args.dry_run:
        print(f"# ---- the job array: {args.shards} shards, one task each (sbatch THIS_PART) ----")
        print(array_script, end="")
        print(f"# ---- the merge job, after every array task succeeded (sbatch, with {ARRAY_ID} the array's id) ----")
        print(render_merge_script(array_script, args.shards, **merge_options), end="")
        return EXIT_OK
    folder = script_dir(array_script)
    folder.mkdir(parents=True, exist_ok=True)
    array_path = folder / "submit-array.sbatch"
    write_script(array_path, array_script)
    array_id = submit(array_script)
    merge_script = render_merge_script(array_script, args.shards, array_id, **merge_options)
    merge_path = folder / "submit-merge.sbatch"
    write_script(merge_path, merge_script)
    merge_id = submit(merge_script)
    print(f"submitted batch job {array_id} (array of {args.shards} shards, script {array_path}) and merge job "
          f"{merge_id} after it (script {merge_path}); follow them with: squeue -j {array_id},{merge_id}")
    print(f"a failed or cancelled task I runs again on its own with: sbatch --array=I {array_path}", file=sys.stderr)
    return EXIT_OK
