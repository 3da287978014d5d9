"""The `tensorfleet` command: parse (the subcommands are the table in commands.py) and run.

Every `--some-option` can also be set by the environment variable TENSORFLEET_SOME_OPTION
(see apply_environment); a value on the command line wins.

Start-up is kept short (a warm fleet's first result should come within a second): this module
imports only the standard library, `run`, `merge`, `status` and `schema` build a parser without the
other subcommands (slurm, top, the coordinator service) and so never import them, and each
command imports only what it uses (tests/coordinator/test_lazy_imports.py guards this), with
the cyclic garbage collector paused until those imports are done (see _started).

Exit codes (tensorfleet/core/exit_codes.py): 0 every row done, 1 some rows failed (see the errors
table), 2 fatal (bad spec, unreadable input, no server reachable, ...), always with a message that
says what to fix.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tensorfleet.core.exit_codes import EXIT_FATAL, EXIT_OK, EXIT_ROWS_FAILED

from .commands import CORE_COMMANDS, SERVER_COMMANDS, add_commands

if TYPE_CHECKING:
    from ..workflows.api import AnyJob, RunOptions, RunResult

__all__ = ["CORE_COMMANDS", "EXIT_FATAL", "EXIT_OK", "EXIT_ROWS_FAILED", "SERVER_COMMANDS", "main"]


def _parser(full: bool = True) -> argparse.ArgumentParser:
    """The command-line parser; `full=False` only for a command line starting with a CORE_COMMANDS
    name, which the other subcommands cannot change (the top-level parser has no options of its own)."""
    parser = argparse.ArgumentParser(prog="tensorfleet", description="Batch inference over a fleet of model servers.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub, full)
    apply_environment(parser)
    return parser


def apply_environment(parser: argparse.ArgumentParser, environ: dict[str, str] | None = None) -> None:
    """Every `--some-option` defaults to $TENSORFLEET_SOME_OPTION when set (flags: 1/true/yes).

    A command-line value still wins; a required option set in the environment is no longer required.
    """
    environ = dict(os.environ if environ is None else environ)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                apply_environment(child, environ)
            continue
        long = next((o for o in action.option_strings if o.startswith("--")), None)
        if long is None or long == "--help":
            continue
        value = environ.get("TENSORFLEET_" + long[2:].upper().replace("-", "_"))
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            action.default = value.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(action, argparse._AppendAction):
            action.default = [action.type(v) if action.type else v for v in value.split(",") if v]
        else:
            action.default = action.type(value) if callable(action.type) else value
        action.required = False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVER_COMMANDS:
        os.execv(sys.executable, [sys.executable, "-m", SERVER_COMMANDS[argv[0]], *argv[1:]])
    global _collect_after_startup
    _collect_after_startup = gc.isenabled()
    gc.disable()  # until the command's imports are done: see _started
    try:
        args = _parser(full=not argv or argv[0] not in CORE_COMMANDS).parse_args(argv)
        if getattr(args, "handler", None) is not None:  # slurm and the coordinator service commands
            _started()
            return args.handler(args)
        if args.command == "schema":
            from ..spec.kinds import json_schema

            _started()
            print(json.dumps(json_schema(), indent=2))
            return EXIT_OK
        if args.command == "status":
            _started()
            return _status(args.job_dir, args.json)
        if args.command == "merge":
            _started()
            from ..workflows.run_command import merge_and_report

            return merge_and_report(args.job, args.job_dir, args.limit, args.wait)
        return _run(args)
    finally:
        _started()


_collect_after_startup = False


def _started() -> None:
    """Start-up imports are done: turn the cyclic garbage collector back on.

    Importing numpy, grpc, pydantic and the coordinator allocates a few hundred thousand
    long-lived objects and frees almost none, so collections during start-up find next to
    nothing (pausing them saves ~15 ms of the ~300 ms of CPU `run` spends importing, measured
    on a 2-core VM). Those objects are then frozen (gc.freeze: kept out of later collections,
    which never had anything to free among them). The collector runs as usual for the rest of
    the command.
    """
    global _collect_after_startup
    if _collect_after_startup:
        _collect_after_startup = False
        gc.freeze()
        gc.enable()


def _run(args: argparse.Namespace) -> int:
    from .finished import finished_summary

    summary = finished_summary(args)  # a finished, unchanged job: answered before the engine is imported
    if summary is not None:
        print(summary)
        return EXIT_OK
    # tensorfleet uses no pydantic plugins; looking for them scans every installed package's entry
    # points when the first spec model is built (~0.1 s of CPU per run, more with a big environment)
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    from ..workflows import api

    _started()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="%(asctime)s %(levelname)s %(message)s"
    )
    signal.signal(signal.SIGTERM, _interrupt)
    shard = None
    if args.shard:
        from ..engine.shard_plan import parse_shard

        try:
            shard = parse_shard(args.shard)
        except api.JobFatal as error:
            print(f"tensorfleet: error: {error}", file=sys.stderr)
            return EXIT_FATAL
    options = api.RunOptions(
        job_dir=args.job_dir, resume=args.resume or args.retry_failed, restart=args.restart, dry_run=args.dry_run,
        limit=args.limit, retry_failed=args.retry_failed,
        servers=names(args.servers), models=names(args.models), shard=shard,
    )
    from ..workflows.run_command import run_and_report

    return run_and_report(args.job, options, on_finished=lambda spec, result: _stamp(args, options, spec, result))


def _stamp(args: argparse.Namespace, options: RunOptions, spec: AnyJob, result: RunResult) -> None:
    """Let the next re-run of this finished job answer before importing the engine (cli/finished.py)."""
    import dataclasses

    from ..workflows import api
    from .finished import record_finished

    if result.output is None or result.uploaded:
        return
    job_dir = api.locations(spec, options)[1]
    outputs = [result.output, *getattr(result, "sheets", [])]
    record_finished(args, job_dir, outputs, dataclasses.replace(result, rows_computed=0).summary())


def names(text: str | None) -> list[str] | None:
    """A comma-separated command-line list; None when unset."""
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _status(target: Path, as_json: bool) -> int:
    from ..engine.status import format_status
    from ..spec.errors import JobFatal
    from ..workflows import api
    from ..workflows.status_target import status_folder

    try:
        job_dir = status_folder(target)  # a job file or an output leads to its job folder
    except JobFatal as error:
        print(f"tensorfleet: error: {error}", file=sys.stderr)
        return EXIT_FATAL
    report = api.status(job_dir)
    if report is None:
        print(f"tensorfleet: error: {job_dir} holds no job (no manifest.sqlite or workflow.json)", file=sys.stderr)
        return EXIT_FATAL
    if report["kind"] == "sharded" and not as_json:
        from ..engine.shard_status import format_sharded

        print(format_sharded(report))
        return EXIT_OK
    print(json.dumps(report, indent=1, sort_keys=True) if as_json else format_status(report))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
