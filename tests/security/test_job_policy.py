"""A job is data, never code: what a job submitted to `coordinator serve` may touch.

Every case submits a hostile spec to a real coordinator on loopback and checks the refusal's
status and message, that the coordinator still serves, that the job was not recorded, and
that nothing appeared outside the allowed roots (the 'outside' folder and the model marker).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from bench.job_specs import minimal_job
from tensorfleet.client import (
    CoordinatorClient,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from tensorfleet.client.coordinator_client import job_state
from tests.coordinator.helpers import MODELS, make_fasta, run_tensorfleet

from .helpers import snapshot, spawned

MARKER = "pwned"


def evil_repository(folder: Path, marker: Path) -> Path:
    """A valid model repository whose python model.py writes `marker` when imported: code in a job."""
    shutil.copytree(MODELS / "embed", folder / "embed")
    code = (folder / "embed" / "model.py").read_text()
    (folder / "embed" / "model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + code)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    for name in ("data", "out", "outside", "models", "evil"):
        (root / name).mkdir()
    make_fasta(root / "data" / "in.fasta", 8)
    make_fasta(root / "outside" / "secret.fasta", 8)
    (root / "data" / "escape.fasta").symlink_to(root / "outside" / "secret.fasta")
    (root / "out" / "escape").symlink_to(root / "outside", target_is_directory=True)
    (root / "outside" / "hosts").write_text("127.0.0.1:1\n")
    evil_repository(root / "evil", root / "outside" / MARKER)
    return root


@pytest.fixture(scope="module")
def coordinator(world):
    args = ["coordinator", "serve", "--state-dir", world / "state", "--data-root", world / "data",
            "--output-root", world / "out", "--model-root", world / "models",
            "--allow-url-prefix", "s3://allowed-bucket/jobs/"]
    with spawned(args, world / "coordinator") as service:
        yield service


def spec(world: Path, **changes) -> dict:
    return minimal_job(world, "attack", "127.0.0.1:1", "result.h5", **changes)


# (id, changes with {w} = the world folder, error type, words the message must hold)
CASES = [
    ("input-outside-data-root", {"input__path": "{w}/outside/secret.fasta"}, PermissionDenied, "--data-root"),
    ("input-symlink-escapes", {"input__path": "{w}/data/escape.fasta"}, PermissionDenied, "outside/secret.fasta"),
    ("input-dotdot-escapes", {"input__path": "{w}/data/../outside/secret.fasta"}, PermissionDenied, "--data-root"),
    ("input-etc-passwd", {"input__path": "/etc/passwd", "input__format": "fasta"}, PermissionDenied, "--data-root"),
    # several files: a glob is expanded (symlinks resolved) before the check, a list is checked file by file
    ("input-glob-symlink-escapes", {"input__path": "{w}/data/*.fasta"}, PermissionDenied, "outside/secret.fasta"),
    ("input-glob-dotdot-escapes", {"input__path": "{w}/data/../outside/*.fasta"}, PermissionDenied, "--data-root"),
    ("input-list-one-outside", {"input__path": ["{w}/data/in.fasta", "{w}/outside/secret.fasta"]}, PermissionDenied,
     "input.path[1]"),
    ("output-outside-root", {"output__path": "{w}/outside/stolen.h5"}, PermissionDenied, "--output-root"),
    ("output-symlinked-folder", {"output__path": "{w}/out/escape/stolen.h5"}, PermissionDenied, "--output-root"),
    ("job-dir-outside", {"job_dir": "{w}/outside/jobdir"}, PermissionDenied, "job_dir"),
    ("hostfile-outside", {"model__servers": ["hostfile:{w}/outside/hosts"]}, PermissionDenied, "model.servers[0]"),
    ("local-repo-outside-model-root", {"model__servers": None, "model__local": {"repository": "{w}/evil"}},
     PermissionDenied, "--model-root"),
    ("local-args-override-repository", {"model__servers": None, "model__local": {
        "repository": "{w}/models", "args": ["--model-repository", "{w}/evil"]}}, PermissionDenied, "--model-repository"),
    ("local-args-listen-wide", {"model__servers": None, "model__local": {
        "repository": "{w}/models", "args": ["--host=0.0.0.0", "--insecure"]}}, PermissionDenied, "--host"),
    ("local-python-chosen", {"model__servers": None, "model__local": {
        "repository": "{w}/models", "python": "{w}/outside/python"}}, PermissionDenied, "local.python"),
    ("local-launcher-chosen", {"model__servers": None, "model__local": {
        "repository": "{w}/models", "launcher": ["sh", "-c", "touch {w}/outside/pwned"]}}, PermissionDenied,
     "local.launcher"),
    ("job-asks-trust-remote-code", {"model__parameters": {"trust_remote_code": True}}, InvalidArgument,
     "transformers.trust_remote_code"),
    ("inline-server-token", {"model__token": "leaky"}, PermissionDenied, "--server-token-file"),
    ("object-store-outside-prefix", {"output__path": "s3://other-bucket/x.h5"}, PermissionDenied, "s3://allowed-bucket/jobs/"),
    ("parts-outside-prefix", {"output__parts": "s3://other-bucket/parts"}, PermissionDenied, "object-store prefixes"),
    ("job-name-dotdot", {"name": ".."}, InvalidArgument, "cannot be used as a name"),
    ("job-name-separator", {"name": "a/../../b"}, InvalidArgument, "name"),
    ("model-name-traversal", {"model__name": "../../outside"}, InvalidArgument, "cannot be used as a name"),
    ("model-name-too-long", {"model__name": "m" * 500}, InvalidArgument, "at most 128"),
]


def _expand(value, world: Path):
    if isinstance(value, str):
        return value.replace("{w}", str(world))
    if isinstance(value, list):
        return [_expand(v, world) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, world) for k, v in value.items()}
    return value


def assert_refused_cleanly(coordinator, world: Path, before: set[str], jobs_before: int) -> None:
    """The coordinator still answers, recorded no job, and nothing appeared outside the roots."""
    with CoordinatorClient(coordinator.address) as client:
        assert len(client.jobs()) == jobs_before
    assert snapshot(world / "outside") == before
    assert not (world / "outside" / MARKER).exists()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_spec_is_refused(coordinator, world, case):
    _, changes, error, words = case
    hostile = spec(world, **{k: _expand(v, world) for k, v in changes.items()})
    before = snapshot(world / "outside")
    with CoordinatorClient(coordinator.address) as client:
        jobs_before = len(client.jobs())
        with pytest.raises(error) as refused:
            client.submit(hostile)
    assert words in refused.value.message, refused.value.message
    assert_refused_cleanly(coordinator, world, before, jobs_before)


def test_relative_paths_with_a_hostile_base_dir_are_refused(coordinator, world):
    hostile = spec(world, input__path="secret.fasta")
    before = snapshot(world / "outside")
    with CoordinatorClient(coordinator.address) as client:
        jobs_before = len(client.jobs())
        with pytest.raises(PermissionDenied, match="--data-root"):
            client.submit(hostile, base_dir=world / "outside")
    assert_refused_cleanly(coordinator, world, before, jobs_before)


def test_spec_over_the_size_limit_is_resource_exhausted(coordinator, world):
    huge = yaml.safe_dump(spec(world)) + "# " + "x" * (2 * 1024 * 1024) + "\n"
    with CoordinatorClient(coordinator.address) as client:
        jobs_before = len(client.jobs())
        with pytest.raises(ResourceExhausted, match="TENSORFLEET_MAX_SPEC_BYTES"):
            client.submit(huge, base_dir=world)
    assert_refused_cleanly(coordinator, world, snapshot(world / "outside"), jobs_before)


def test_yaml_alias_bomb_is_refused(coordinator, world):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = "\n".join(lines) + "\n"
    with CoordinatorClient(coordinator.address) as client:
        jobs_before = len(client.jobs())
        with pytest.raises(ResourceExhausted, match="alias"):
            client.submit(bomb, base_dir=world)
    assert_refused_cleanly(coordinator, world, snapshot(world / "outside"), jobs_before)


def test_an_absurd_job_id_is_refused(coordinator, world):
    with CoordinatorClient(coordinator.address) as client, pytest.raises(InvalidArgument, match="job_id"):
        client.get("x" * 10_000)
    assert_refused_cleanly(coordinator, world, snapshot(world / "outside"), 0)


def test_an_allowed_job_is_accepted(coordinator, world):
    """The control case: the same coordinator takes a job that stays inside its roots."""
    with CoordinatorClient(coordinator.address) as client:
        job = client.submit(spec(world, name="fine", policy={"server_wait_s": 1}))
        assert job.job_id.startswith("fine-")
        final = client.wait(job.job_id)  # accepted, then fails for want of a server: not refused
        assert job_state(final) == "FAILED" and "no server reachable" in final.error, final.error


def test_reproduction_default_coordinator_refuses_a_repository_with_code(world, tmp_path):
    """Issue 11's reproduction: a default `coordinator serve` (no flags but the state folder), no
    token, a job whose model.local.repository holds a python model.py. Refused; the code never ran."""
    make_fasta(tmp_path / "in.fasta", 4)
    marker = tmp_path / "marker"
    evil = evil_repository(tmp_path / "evil", marker)
    job = {"name": "repro", "input": {"path": str(tmp_path / "in.fasta")},
           "model": {"name": "embed", "local": {"repository": str(evil)}}, "output": {"path": "out.h5"}}
    (tmp_path / "repro.yaml").write_text(yaml.safe_dump(job))
    with spawned(["coordinator", "serve", "--state-dir", tmp_path / "state"], tmp_path) as service:
        with CoordinatorClient(service.address) as client:
            with pytest.raises(PermissionDenied) as refused:
                client.submit(tmp_path / "repro.yaml")
            assert "starts no servers for submitted jobs" in refused.value.message
            assert "model.servers" in refused.value.message
            assert client.jobs() == []
    assert not marker.exists()
    # The attack is real: the same file through `tensorfleet run` (one's own machine) runs that code.
    done = run_tensorfleet("run", tmp_path / "repro.yaml")
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "ran"
