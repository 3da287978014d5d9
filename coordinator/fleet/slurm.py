"""`tensorfleet slurm JOB.yaml --gpus N`: run a job on a SLURM allocation with one sbatch script.

The script starts one model server per GPU as the tasks of one background `srun` step
(`--gpus-per-task=1`, so SLURM binds each task to its own GPU and the server uses `cuda:0`),
each task writing its `host:port` to a hostfile in the run folder; a coordinator step waits for
every server's gRPC health and runs `tensorfleet run JOB --servers <hostfile>`; then the servers
are stopped. Steps share the allocation with `srun --overlap`: without it the coordinator step
would wait for CPUs the servers hold, silently, forever.

The two helpers those steps run, `python -m tensorfleet.coordinator.fleet.slurm serve-task` and
`... wait-healthy`, are in slurm_steps.py; main() here is their entry point.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tensorfleet.core.auth import token_from
from tensorfleet.core.exit_codes import EXIT_FATAL, EXIT_OK

from .sbatch_script import placement_options, sbatch_option, script_header, write_script
from .slurm_steps import (
    MAX_RESTARTS,
    RESTART_TIMEOUT_S,
    SlurmError,
    failed_file,
    read_hostfile,
    serve_task,
    stop_file,
    wait_healthy,
)

__all__ = ["MAX_RESTARTS", "RESTART_TIMEOUT_S", "SlurmError", "failed_file", "main", "read_hostfile",
           "render_batch_script", "serve_task", "stop_file", "submit", "wait_healthy"]


def _q(value: object) -> str:
    return shlex.quote(str(value))


def render_batch_script(
    job_path: Path | str,
    gpus: int,
    partition: str | None = None,
    time: str | None = None,
    cpus_per_task: int | None = None,
    python: str = sys.executable,
    devices: str = "cuda",
    *,
    model_repository: Path | str | None = None,
    run_dir: Path | str | None = None,
    account: str | None = None,
    mem_per_cpu: str | None = None,
    server_args: list[str] | None = None,
    run_args: list[str] | None = None,
    startup_timeout: float | None = None,
    drain_wait: float = 60.0,
    container: Path | str | None = None,
    container_runtime: str = "apptainer",
    shards: int | None = None,
) -> str:
    """One sbatch script: `gpus` servers (CPU servers with devices='cpu'), then the job on them.

    One function on purpose (over the 80-line rule): it is a template, read top to bottom in the
    order the script runs; split, the script's lines would be spread over helpers.

    The model repository and extra server arguments come from the job's `model.local`
    unless given here; every path in the script is absolute, since steps run on other nodes.
    With `shards`, the script is a job array: task I runs shard I of the job on its own servers
    (`tensorfleet run JOB --shard I/N`, slurm_shards.py adds the merge job after it).
    """
    from ..spec import SpecError
    from ..spec.kinds import load_job, models_of, tools_of

    if gpus < 1:
        raise SlurmError("--gpus must be at least 1")
    if devices not in ("cuda", "cpu"):
        raise SlurmError(f"devices must be 'cuda' or 'cpu', not {devices!r}")
    job_path = Path(job_path).resolve()
    try:
        spec = load_job(job_path)
    except SpecError as error:
        raise SlurmError(str(error)) from None
    # Every server serves every model the job uses (a multi-stage job's stages, a sweep's models).
    models = models_of(spec)
    names = list(dict.fromkeys(m.name for m in models))
    locals_ = [m.local for m in models if m.local is not None]
    local = locals_[0] if locals_ else None
    if model_repository is None:
        repositories = sorted({str(Path(item.repository).resolve()) for item in locals_})
        if len(locals_) < len(models) or not repositories:
            raise SlurmError(
                f"{job_path}: model.servers names running servers; give --model-repository "
                "(or use model.local in the job file) so the batch job can start its own"
            )
        if len(repositories) > 1:
            raise SlurmError(
                f"{job_path}: the job's models live in several repositories {repositories}; the batch job's servers "
                "load every model from one: put them in one repository or give --model-repository"
            )
        model_repository = repositories[0]
    tokens = {m.token for m in models}
    if len(tokens) > 1:
        raise SlurmError(f"{job_path}: the job's models name different tokens; the batch job's servers share one")
    token_value = tokens.pop()
    repository = Path(model_repository).resolve()
    extra = list(server_args if server_args is not None else (local.args if local else []))
    timeout = startup_timeout or max([item.startup_timeout_s for item in locals_] or [300.0])
    run_root = Path(run_dir).resolve() if run_dir else job_path.parent / f"{spec.name}.slurm"
    if container:  # every step runs the image's python: `apptainer exec [--nv] IMAGE python`
        image = str(Path(container).resolve())
        launcher = [container_runtime, "exec", *(["--nv"] if devices == "cuda" else []), image, "python"]
    else:
        launcher = [str(Path(python).absolute())]

    sbatch = [f"--job-name=tensorfleet-{spec.name}", f"--ntasks={gpus}"]
    if devices == "cuda":
        sbatch.append("--gpus-per-task=1")
    if cpus_per_task:
        sbatch.append(f"--cpus-per-task={int(cpus_per_task)}")
    if mem_per_cpu:
        sbatch.append(f"--mem-per-cpu={mem_per_cpu}")
    sbatch += placement_options(partition, account, time)
    if shards:  # one array task per shard; each its own servers, run folder and log
        sbatch.append(f"--array=0-{int(shards) - 1}")
        sbatch.append(f"--output={run_root}/slurm-%A_%a.out")
    else:
        sbatch.append(f"--output={run_root}/slurm-%j.out")

    device = "cuda:0" if devices == "cuda" else "cpu"  # cuda:0 = the one GPU SLURM gave the task
    # Other nodes reach the servers, so they listen beyond loopback and require a token (below).
    server = ["--host", "0.0.0.0", "--model-repository", str(repository),
              *(a for n in names for a in ("--model", n)), "--device", device]
    if devices == "cpu" and cpus_per_task:
        server += ["--threads", str(int(cpus_per_task))]
    server += extra
    server_step = ["srun", "--overlap", f"--ntasks={gpus}"]
    if devices == "cuda":
        server_step.append("--gpus-per-task=1")
    server_step += ["--kill-on-bad-exit=0", '--output="$RUN_DIR/server-%t.log"']
    # With a token in the job file the servers require it too (they read TENSORFLEET_TOKEN);
    # without one, each batch job makes its own, in a file only its user can read.
    token = [f"export TENSORFLEET_TOKEN={_q(token_value)}"] if token_value else [
        "# A token for this batch job's servers: they listen beyond loopback, so they require one.",
        '( umask 077 && "${PYTHON[@]}" -c "import secrets; print(secrets.token_urlsafe(32))" > "$RUN_DIR/token" ) '
        "|| exit 2",
        'export TENSORFLEET_TOKEN_FILE="$RUN_DIR/token" TENSORFLEET_SERVER_TOKEN_FILE="$RUN_DIR/token"',
    ]
    run = ["run", '"$JOB"', '--servers "$SERVER_LIST"', *(_q(a) for a in (run_args or []))]
    if shards:
        run.append(f'--shard "$SLURM_ARRAY_TASK_ID/{int(shards)}"')

    lines = [
        *script_header([
            f"Written by `tensorfleet slurm` for {job_path}.",
            f"{gpus} model server(s) ({'one GPU each' if devices == 'cuda' else 'CPU'}) run as the tasks of one background",
            "srun step; a coordinator step waits for their gRPC health and runs the job; then the",
            "servers drain and stop. Submit with: sbatch THIS_FILE",
        ], sbatch),
        f"PYTHON=({' '.join(_q(part) for part in launcher)})",
        f"JOB={_q(job_path)}",
        (f'RUN_DIR={_q(run_root)}/"job-${{SLURM_ARRAY_JOB_ID:-$$}}_${{SLURM_ARRAY_TASK_ID:-0}}"' if shards else
         f'RUN_DIR={_q(run_root)}/"job-${{SLURM_JOB_ID:-$$}}"'),
        'HOSTFILE="$RUN_DIR/servers"',
        'mkdir -p "$RUN_DIR" && : > "$HOSTFILE" || exit 2',
        "export PYTHONUNBUFFERED=1",
        *token,
        "",
        "# Servers: each task binds a free port, then appends host:port to the hostfile.",
        " ".join(server_step) + " \\",
        '    "${PYTHON[@]}" -m tensorfleet.coordinator.fleet.slurm serve-task --hostfile "$HOSTFILE" -- \\',
        "    " + " ".join(_q(a) for a in server) + " &",
        "SERVERS_PID=$!",
        "stop_servers() {  # the stop file makes each server drain and exit; srun if they hang",
        '    touch "$HOSTFILE.stop"',
        f"    for _ in $(seq {int(drain_wait)}); do",
        '        kill -0 "$SERVERS_PID" 2>/dev/null || break',
        "        sleep 1",
        "    done",
        '    kill -TERM "$SERVERS_PID" 2>/dev/null',
        '    wait "$SERVERS_PID" 2>/dev/null',
        "}",
        "trap stop_servers EXIT",
        "",
        "# Coordinator: wait until every server reports SERVING (models loaded), then run the job.",
        *(f"# Tool stage {name} runs in this coordinator step, on the batch host, inside the allocation: {command[0]}"
          for name, command in tools_of(spec)),
        'SERVER_LIST=$(srun --overlap --ntasks=1 --nodes=1 \\',
        f'    "${{PYTHON[@]}}" -m tensorfleet.coordinator.fleet.slurm wait-healthy "$HOSTFILE" {gpus} \\',
        f"    {' '.join(f'--model {_q(n)}' for n in names)} --timeout {float(timeout):g})",
        "if [ -z \"$SERVER_LIST\" ]; then",
        '    echo "tensorfleet: the servers did not become healthy; their logs are in $RUN_DIR" >&2',
        "    exit 2",
        "fi",
        'echo "tensorfleet: servers $SERVER_LIST"',
        'srun --overlap --ntasks=1 --nodes=1 "${PYTHON[@]}" -m tensorfleet.coordinator ' + " ".join(run),
        "status=$?",
        'echo "tensorfleet: job finished with exit code $status"',
        "exit $status",
        "",
    ]
    return "\n".join(lines)


def submit(script: str, sbatch: str = "sbatch", env: dict[str, str] | None = None) -> str:
    """Submit with `sbatch --parsable`; return the job id."""
    if shutil.which(sbatch, path=(env or os.environ).get("PATH")) is None:
        raise SlurmError(f"'{sbatch}' is not on PATH: run this on a SLURM login node, or use --dry-run")
    done = subprocess.run(
        [sbatch, "--parsable"], input=script, capture_output=True, text=True, env=env, timeout=120
    )
    if done.returncode != 0:
        raise SlurmError(f"sbatch failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]  # "<id>[;cluster]"


# ------------------------------------------------------------------ the CLI subcommand


def add_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `tensorfleet slurm`; the parser's `handler` default runs it (returns an exit code)."""
    env = os.environ.get
    parser = subparsers.add_parser(
        "slurm",
        help="run a job on SLURM: one server per GPU plus the coordinator, in one sbatch job",
        description="Write one sbatch script (one srun server task per GPU, then a coordinator "
        "step that waits for their health and runs the job) and submit it.",
    )
    parser.add_argument("job", type=Path, help="job file (YAML)")
    parser.add_argument("--gpus", type=int, required=env("TENSORFLEET_GPUS") is None,
                        default=int(env("TENSORFLEET_GPUS", "0")) or None,
                        help="servers to start, one GPU each (CPU servers with --cpu)")
    parser.add_argument("--partition", default=env("TENSORFLEET_PARTITION"))
    parser.add_argument("--time", default=env("TENSORFLEET_TIME"), help="wall-time limit, e.g. 02:00:00")
    parser.add_argument("--account", default=env("TENSORFLEET_ACCOUNT"))
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPUs for each server")
    parser.add_argument("--mem-per-cpu", default=None, help="e.g. 4G")
    parser.add_argument("--cpu", action="store_true", help="CPU servers instead of GPU servers")
    parser.add_argument("--model-repository", type=Path, default=None,
                        help="default: the job file's model.local.repository")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="hostfile, server logs and slurm output (a shared filesystem); "
                        "default: <job folder>/<job name>.slurm")
    parser.add_argument("--startup-timeout", type=float, default=None,
                        help="seconds the servers may take to load models (default: the job's)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the job (what tensorfleet run does with no flag; kept for old scripts)")
    mode.add_argument("--restart", action="store_true", help="pass --restart to tensorfleet run")
    parser.add_argument("--python", default=sys.executable, help="python that runs the steps")
    parser.add_argument("--container", type=Path, default=env("TENSORFLEET_CONTAINER"),
                        help="run every step in this Apptainer image (built from deploy/apptainer)")
    parser.add_argument("--shards", type=int, default=None, metavar="N",
                        help="run the job as N shards: a job array (each task its own --gpus servers and "
                        "`tensorfleet run --shard I/N`) and a merge job after it (docs/deploy.md)")
    parser.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    parser.set_defaults(handler=run_subcommand)
    return parser


def run_subcommand(args: argparse.Namespace) -> int:
    run_args = ["--resume"] if args.resume else ["--restart"] if args.restart else []
    try:
        script = render_batch_script(
            args.job, args.gpus, partition=args.partition, time=args.time,
            cpus_per_task=args.cpus_per_task, python=args.python,
            devices="cpu" if args.cpu else "cuda", model_repository=args.model_repository,
            run_dir=args.run_dir, account=args.account, mem_per_cpu=args.mem_per_cpu,
            run_args=run_args, startup_timeout=args.startup_timeout, container=args.container,
            shards=_shards(args),
        )
        if args.shards:
            from .slurm_shards import submit_sharded

            return submit_sharded(args, script, submit, _script_dir)
        if args.dry_run:
            print(script, end="")
            return EXIT_OK
        script_dir = _script_dir(script)
        script_dir.mkdir(parents=True, exist_ok=True)
        path = script_dir / "submit.sbatch"
        write_script(path, script)
        job_id = submit(script)
    except SlurmError as error:
        print(f"tensorfleet: error: {error}", file=sys.stderr)
        return EXIT_FATAL
    print(f"submitted batch job {job_id} (script {path}); follow it with: squeue -j {job_id}")
    return EXIT_OK


def _shards(args: argparse.Namespace) -> int | None:
    shards = getattr(args, "shards", None)
    if shards is not None and shards < 1:
        raise SlurmError("--shards must be at least 1")
    return shards


def _script_dir(script: str) -> Path:
    """Where a script is saved: its SLURM output's folder (the run folder)."""
    output = sbatch_option(script, "output")
    return Path(output).parent if output else Path.cwd()


# ------------------------------------------------------------------ the helpers' entry point (steps in slurm_steps.py)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tensorfleet.coordinator.fleet.slurm")
    sub = parser.add_subparsers(dest="command", required=True)
    task = sub.add_parser("serve-task", help="one model server of a batch job (an srun task)")
    task.add_argument("--hostfile", type=Path, required=True)
    task.add_argument("--host", default=None, help="name other nodes reach this one by")
    task.add_argument("server_args", nargs=argparse.REMAINDER, help="-- then the server's arguments")
    wait = sub.add_parser("wait-healthy", help="wait for the hostfile's servers; print them comma-separated")
    wait.add_argument("hostfile", type=Path)
    wait.add_argument("count", type=int)
    wait.add_argument("--timeout", type=float, default=300.0)
    wait.add_argument("--model", action="append", default=None, help="a model every server must serve (repeatable)")
    wait.add_argument("--token", default=os.environ.get("TENSORFLEET_TOKEN"))
    add_subcommand(sub)  # `... slurm JOB --gpus N`: the same command as `tensorfleet slurm`
    args = parser.parse_args(argv)
    if args.command == "slurm":
        return run_subcommand(args)
    if args.command == "wait-healthy" and not args.token:
        args.token = token_from(None, None)  # $TENSORFLEET_TOKEN_FILE, as the batch script exports it
    if args.command == "serve-task":
        server_args = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
        return serve_task(args.hostfile, server_args, args.host)
    try:
        servers = wait_healthy(args.hostfile, args.count, args.timeout, args.model, args.token)
    except SlurmError as error:
        print(f"tensorfleet: error: {error}", file=sys.stderr)
        return EXIT_FATAL
    print(",".join(servers))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
