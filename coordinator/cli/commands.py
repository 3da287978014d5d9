"""The table of `tensorfleet` subcommands: one list, in the order `tensorfleet --help` shows them.

Each row names a subcommand and the function that adds its parser; a layer contributes its own
parser (the SLURM submitter in fleet/, `top` in service/, the service clients in service_cli.py),
but a command exists only once it has a row here. A new command is one row and one `add_*`
function; its parser sets `handler` (a function of the parsed args returning an exit code) unless
it is one of the commands main() runs itself (run, merge, status, schema; serve and doctor are handed to
the model server's process).

Rows marked `core` are added by functions in this module (standard library only): a command line
starting with run, merge, status or schema builds a parser of those rows alone, so `tensorfleet run`
never imports the modules of the others (tests/coordinator/test_lazy_imports.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Adder = Callable[[argparse._SubParsersAction], object]


def add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a job file: shard, infer, checkpoint, merge")
    run.add_argument("job", type=Path, help="job file (YAML); see `tensorfleet schema`")
    run.add_argument("--job-dir", type=Path, help="checkpoint folder (default: job_dir in the spec, else <output>.tfjob)")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the job in the job folder (what no flag does; kept for old scripts)")
    mode.add_argument("--restart", action="store_true", help="discard the job folder and start over")
    mode.add_argument("--retry-failed", action="store_true",
                      help="continue the job (as --resume) and compute again the chunks holding failed rows")
    run.add_argument("--dry-run", action="store_true", help="print the plan; compute and write nothing")
    run.add_argument("--limit", type=int, help="only the first N rows (a smoke test; separate output and folder)")
    run.add_argument("--servers", help="comma-separated host:port list; replaces every model's servers/local "
                     "(the servers must serve every model the job uses)")
    run.add_argument("--models", help="models x sources jobs: comma-separated names of the models to run")
    run.add_argument("--shard", metavar="I/N", help="run shard I (0 to N-1) of N: one contiguous slice of the plan, "
                     "in the same job folder; the last shard to finish merges (docs/deploy.md)")
    run.add_argument("-v", "--verbose", action="store_true", help="log server events")


def add_merge(sub: argparse._SubParsersAction) -> None:
    merge = sub.add_parser("merge", help="merge a sharded job's shards into its one output (every shard complete)")
    merge.add_argument("job", type=Path, help="job file (YAML) run with --shard I/N")
    merge.add_argument("--job-dir", type=Path, help="checkpoint folder (default: as `tensorfleet run`)")
    merge.add_argument("--limit", type=int, help="the shards' --limit, if they ran with one")
    merge.add_argument("--wait", action="store_true",
                       help="wait until every shard is complete, then merge (a merge Job started beside the shards)")


def add_status(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="progress of a job of any kind, from its (top) folder")
    status.add_argument("job_dir", type=Path, metavar="JOB_DIR|JOB_FILE|OUTPUT",
                        help="the job folder, or the job file, or the output (its <output>.tfjob folder)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")


def add_schema(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("schema", help="print the job file's JSON schema")


def add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run a model server (python -m tensorfleet.services ...)", add_help=False)
    serve.add_argument("args", nargs=argparse.REMAINDER)


def add_doctor(sub: argparse._SubParsersAction) -> None:
    doctor = sub.add_parser("doctor", help="check versions, devices, model repository and ports", add_help=False)
    doctor.add_argument("args", nargs=argparse.REMAINDER)


# --- the rows of other layers: each imports its module only when the full parser is built ----------
def add_slurm(sub: argparse._SubParsersAction) -> None:
    from ..fleet.slurm import add_subcommand

    add_subcommand(sub)


def add_top(sub: argparse._SubParsersAction) -> None:
    from ..service.top import add_subcommand

    add_subcommand(sub)


def add_embed(sub: argparse._SubParsersAction) -> None:
    from .embed_cli import add_subcommand

    add_subcommand(sub)


def _service_cli(name: str) -> Adder:
    def add(sub: argparse._SubParsersAction) -> None:
        from . import service_cli

        getattr(service_cli, f"add_{name}")(sub)

    return add


@dataclass(frozen=True)
class Command:
    name: str
    add: Adder
    #: Added by a function of this module (no import): offered by the short parser too.
    core: bool = False


#: Every subcommand, in --help order: a job's life, the coordinator service and its clients,
#: then the model server's own commands.
COMMANDS: tuple[Command, ...] = (
    Command("run", add_run, core=True),
    Command("merge", add_merge, core=True),
    Command("status", add_status, core=True),
    Command("schema", add_schema, core=True),
    Command("slurm", add_slurm),
    Command("coordinator", _service_cli("coordinator")),
    Command("submit", _service_cli("submit")),
    Command("watch", _service_cli("watch")),
    Command("jobs", _service_cli("jobs")),
    Command("cancel", _service_cli("cancel")),
    Command("resume", _service_cli("resume")),
    Command("retry", _service_cli("retry")),
    Command("servers", _service_cli("servers")),
    Command("top", add_top),
    Command("serve", add_serve, core=True),
    Command("doctor", add_doctor, core=True),
    Command("infer", _service_cli("infer")),
    Command("embed", add_embed),
)

#: A command line starting with one of these builds the parser of the `core` rows alone.
CORE_COMMANDS = frozenset({"run", "merge", "status", "schema"})

#: Subcommands that belong to the server side: the process is handed over to them, so the
#: coordinator never imports `tensorfleet.services`.
SERVER_COMMANDS = {"serve": "tensorfleet.services", "doctor": "tensorfleet.services.doctor"}


def add_commands(sub: argparse._SubParsersAction, full: bool = True) -> None:
    """Every row of COMMANDS (`full=False`: the core rows only), in order."""
    for command in COMMANDS:
        if full or command.core:
            command.add(sub)
