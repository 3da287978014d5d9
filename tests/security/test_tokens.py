"""Tokens: read from files (never on the command line), two roles on the coordinator, and never
written anywhere a job leaves files (state folder, job folder, output, logs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from tensorfleet.client import (
    ConnectionOptions,
    CoordinatorClient,
    InferenceClient,
    PermissionDenied,
    Unauthenticated,
)
from tensorfleet.client.coordinator_client import job_state
from tests.coordinator.helpers import MODELS, make_fasta
from tests.serving import REPO_ROOT

from .helpers import run_cli, snapshot, spawned

TOKENS = {"submit": "submit-7f3a9c1e5b", "read": "read-0d8e2b4a61", "server": "server-c95e17b3d2"}
SIMPLE = REPO_ROOT / "tests" / "models"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A model server requiring the server token, and a coordinator with both roles and the server token."""
    root = tmp_path_factory.mktemp("tokens")
    files = {}
    for role, token in TOKENS.items():
        files[role] = root / "secrets" / role
        files[role].parent.mkdir(exist_ok=True)
        files[role].write_text(token + "\n")
    (root / "work").mkdir()
    with spawned(["serve", "--model-repository", MODELS, "--model", "embed", "--token-file", files["server"]],
                 root / "server") as server, spawned(
        ["coordinator", "serve", "--state-dir", root / "state", "--token-file", files["submit"],
         "--read-token-file", files["read"], "--server-token-file", files["server"], "--servers", server.address,
         "--data-root", root / "work", "--output-root", root / "work"], root / "coordinator") as coordinator:
        yield {"root": root, "files": files, "server": server, "coordinator": coordinator}


def _client(fleet, token: str | None) -> CoordinatorClient:
    return CoordinatorClient(fleet["coordinator"].address, options=ConnectionOptions(token=token))


def _job(fleet, name: str) -> Path:
    work = fleet["root"] / "work"
    make_fasta(work / f"{name}.fasta", 40)
    spec = {"name": name, "input": {"path": f"{name}.fasta"},
            "model": {"name": "embed", "servers": [fleet["server"].address]},
            "output": {"path": f"{name}.h5"}, "chunking": {"chunk_rows": 16}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("token", [None, "wrong", TOKENS["submit"] + " ", TOKENS["server"]])
def test_coordinator_without_a_valid_token_is_unauthenticated(fleet, token):
    with _client(fleet, token) as client:
        with pytest.raises(Unauthenticated, match="bearer token"):
            client.jobs()
        with pytest.raises(Unauthenticated):
            client.submit(_job(fleet, "anon"))
    with _client(fleet, TOKENS["read"]) as client:  # still serving, and nothing was queued
        assert all(job.name != "anon" for job in client.jobs())


def test_read_token_reads_but_may_not_submit_or_cancel(fleet):
    with _client(fleet, TOKENS["read"]) as client:
        client.jobs()
        client.servers()
        with pytest.raises(PermissionDenied, match="SubmitJob needs the submit token"):
            client.submit(_job(fleet, "reader"))
        with pytest.raises(PermissionDenied, match="CancelJob needs the submit token"):
            client.cancel("any-job")
        with pytest.raises(PermissionDenied, match="RetryJob needs the submit token"):
            client.retry("any-job")
        assert all(job.name != "reader" for job in client.jobs())


def test_model_server_token_file_is_required(fleet):
    rows = {"sequence": np.array([b"ACDE"], dtype=object)}
    with InferenceClient(fleet["server"].address) as client, pytest.raises(Unauthenticated):
        client.infer("embed", rows)
    with InferenceClient(fleet["server"].address, token=TOKENS["server"]) as client:
        assert client.infer("embed", rows)["embedding"].shape == (1, 16)


def test_tokens_never_appear_on_the_command_line(fleet):
    for process in (fleet["server"].process, fleet["coordinator"].process):
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace")
        assert not any(token in cmdline for token in TOKENS.values())


def test_submit_wait_with_a_token_file_and_no_token_in_any_file_the_job_leaves(fleet):
    root, files = fleet["root"], fleet["files"]
    job = _job(fleet, "leakcheck")
    done = run_cli(["submit", job, "--wait", "--coordinator", fleet["coordinator"].address],
                   env={"TENSORFLEET_TOKEN_FILE": str(files["submit"])}, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    with _client(fleet, TOKENS["read"]) as client:
        (record,) = [j for j in client.jobs() if j.name == "leakcheck"]
        assert job_state(record) == "SUCCEEDED" and record.rows_done == 40
        shown = str(record) + "".join(str(e) for e in client.watch(record.job_id))
    assert not any(token in shown for token in TOKENS.values())
    # every file under the state folder, the job folder, the outputs and the service logs
    leaked = []
    for path in root.rglob("*"):
        if path.is_file() and "secrets" not in path.parts:
            data = path.read_bytes()
            leaked += [f"{path}: {role}" for role, token in TOKENS.items() if token.encode() in data]
    assert leaked == []
    assert (root / "work" / "leakcheck.h5").is_file()
    assert any(p.name == "status.json" for p in root.rglob("status.json"))


def test_cli_without_the_token_file_fails_with_a_clear_message(fleet):
    done = run_cli(["jobs", "--coordinator", fleet["coordinator"].address])
    assert done.returncode == 2 and "bearer token" in done.stderr
    ok = run_cli(["jobs", "--coordinator", fleet["coordinator"].address, "--token-file", fleet["files"]["read"]])
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("content", ["", "two words\n"])
def test_a_bad_token_file_stops_the_start(tmp_path, content):
    bad = tmp_path / "token"
    bad.write_text(content)
    before = snapshot(tmp_path)
    done = run_cli(["serve", "--model-repository", SIMPLE, "--model", "simple", "--token-file", bad])
    assert done.returncode == 2 and f"token file {bad}" in done.stderr, done.stderr
    done = run_cli(["coordinator", "serve", "--state-dir", tmp_path / "state", "--token-file", bad])
    assert done.returncode == 2 and f"token file {bad}" in done.stderr, done.stderr
    assert snapshot(tmp_path) == before


def test_top_reads_the_servers_token_from_a_file(fleet):
    """`top --servers` against servers that require a token: the token comes from a file, never
    the command line (where ps shows it)."""
    import json

    server = fleet["server"].address
    refused = run_cli(["top", "--once", "--json", "--servers", server])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert any("unauthenticated" in error.lower() or "token" in error.lower()
               for error in json.loads(refused.stdout)["errors"]), refused.stdout
    shown = run_cli(["top", "--once", "--json", "--servers", server, "--server-token-file", fleet["files"]["server"]])
    assert shown.returncode == 0, shown.stdout + shown.stderr
    snapshot = json.loads(shown.stdout)
    assert snapshot["errors"] == [] and [row["address"] for row in snapshot["servers"]] == [server]
    assert TOKENS["server"] not in shown.stdout + shown.stderr
