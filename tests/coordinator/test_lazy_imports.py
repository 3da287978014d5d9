"""`tensorfleet run` imports only what the job uses before its first result (issue 6, warm_start).

Each test is a fresh interpreter: what an import pulls in depends on what was imported before.
The heavy libraries listed here are all installed in the dev environment, so each assertion
really checks something: h5py, pyarrow, anndata, pandas and scipy belong to the readers and
writers of other formats (and to the merge), torch and tensorflow to the servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.serving import running_server

from .helpers import MODELS, REPO_ROOT, make_fasta, write_job

#: Never needed by the coordinator for a FASTA job before its first chunk is committed.
HEAVY = ("torch", "tensorflow", "anndata", "pandas", "pyarrow", "h5py", "scipy", "fsspec", "s3fs", "boto3", "rich")
#: Coordinator modules a plain `run` leaves for later or never needs.
DEFERRED = (
    "tensorfleet.services",  # the server side: `serve` and `doctor` exec a new process
    "tensorfleet.coordinator.fleet.slurm",
    "tensorfleet.coordinator.cli.service_cli",
    "tensorfleet.coordinator.service",  # the whole service layer: its gRPC API, jobs, dashboard, top
    "tensorfleet.coordinator.workflows.pipeline",
    "tensorfleet.coordinator.workflows.sweep",
    "tensorfleet.coordinator.workflows.incontext",
    "tensorfleet.coordinator.fleet.local_fleet",  # model.local only
    "tensorfleet.coordinator.engine.merge",  # after the last chunk
    "tensorfleet.coordinator.io.writers",
)


def _modules(code: str, *args: str) -> set[str]:
    """sys.modules of a fresh interpreter after `code`, which prints them as its last line."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_the_cli_module_imports_only_the_standard_library():
    modules = _modules("""
        import json, sys
        import tensorfleet.coordinator.cli
        print(json.dumps(sorted(sys.modules)))
    """)
    assert not _loaded(modules, ("numpy", "grpc", "pydantic", "yaml", "google", *HEAVY, *DEFERRED))


def test_run_imports_neither_heavy_libraries_nor_other_commands():
    modules = _modules("""
        import json, sys
        from tensorfleet.coordinator import cli
        cli._parser(full=False).parse_args(["run", "job.yaml"])
        import tensorfleet.coordinator.engine.job
        import tensorfleet.coordinator.io.readers.fasta
        print(json.dumps(sorted(sys.modules)))
    """)
    assert "tensorfleet.coordinator.engine.dispatcher" in modules  # the check below is not vacuous
    assert not _loaded(modules, (*HEAVY, *DEFERRED))


def test_full_parser_still_offers_every_command():
    modules = _modules("""
        import json, sys
        from tensorfleet.coordinator import cli
        choices = cli._parser()._subparsers._group_actions[0].choices
        assert {"run", "status", "schema", "slurm", "top", "coordinator", "submit"} <= set(choices)
        print(json.dumps(sorted(sys.modules)))
    """)
    assert "tensorfleet.coordinator.cli.service_cli" in modules


def test_the_core_parser_reads_the_same_arguments_and_environment_as_the_full_one(monkeypatch):
    from tensorfleet.coordinator import cli

    monkeypatch.setenv("TENSORFLEET_LIMIT", "7")
    monkeypatch.setenv("TENSORFLEET_VERBOSE", "yes")
    argv = ["run", "job.yaml", "--servers", "a:1,b:2", "--resume"]
    core, full = cli._parser(full=False).parse_args(argv), cli._parser().parse_args(argv)
    assert vars(core) == vars(full)
    assert (core.limit, core.verbose, core.resume, core.servers) == (7, True, True, "a:1,b:2")
    assert vars(cli._parser(full=False).parse_args(["status", "d", "--json"])) == vars(
        cli._parser().parse_args(["status", "d", "--json"])
    )


#: Runs `tensorfleet run ARGS...` in this interpreter and writes the modules loaded when the
#: first part file is stored (the first result) and at the end, as JSON, to the file in argv[1].
_DRIVER = """
    import json, sys
    import tensorfleet.coordinator.io.part_store as part_store

    seen = {}
    store = part_store.store_part

    def store_part(*args, **kwargs):
        seen.setdefault("first_result", sorted(sys.modules))
        return store(*args, **kwargs)

    part_store.store_part = store_part  # before the job module imports it
    from tensorfleet.coordinator.cli import main

    code = main(sys.argv[2:])
    seen["end"] = sorted(sys.modules)
    with open(sys.argv[1], "w") as handle:
        json.dump(seen, handle)
    print(json.dumps([]))
    sys.exit(code)
"""


def test_a_fasta_job_stores_its_first_result_before_importing_writers_or_heavy_libraries(tmp_path: Path):
    make_fasta(tmp_path / "in.fasta", 40)
    with running_server(MODELS) as server:
        job = write_job(
            tmp_path / "job.yaml",
            input={"path": "in.fasta"},
            model={"name": "embed", "servers": [server.address]},
            output={"path": "out.h5"},
            chunking={"chunk_rows": 8, "batch_rows": 4},
        )
        _modules(_DRIVER, str(tmp_path / "modules.json"), "run", str(job), "--limit", "24")
    seen = json.loads((tmp_path / "modules.json").read_text())
    first = set(seen["first_result"])
    assert not _loaded(first, (*HEAVY, *DEFERRED))
    # the merge then writes HDF5: the writer's library comes in only now
    assert (tmp_path / "out.limit24.h5").is_file()
    assert "h5py" in seen["end"] and "tensorfleet.coordinator.engine.merge" in seen["end"]
