"""The README's shell commands run as written (issue 29: a README that is true).

Every command in the README's ```bash blocks is read from the README itself and must be listed in
README_COMMANDS below, with how it runs here or why it is skipped; a command added to the
README without an entry fails this test, and so does an entry the README no longer has.

What runs, as a new user runs it after `make demo`, from a mirror of the checkout (its .venv,
examples/models, examples/data and tests/models linked, examples/jobs copied) so the run writes
nowhere in the checkout: the two servers (examples/models, and tests/models with REST),
every grpcurl and curl command against them, then the demo job itself and `status` on its job
folder, and the same `run` again, which must now be a quick exit 0 naming the output.
The one change: a server's `--port 8001` / `--http-port 8000` become free ports (other tests
and helpers use the machine at the same time), and each client command is pointed at the
server that serves its model.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tensorfleet.core.process import start_and_wait, stop_processes

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"


@dataclass(frozen=True)
class Entry:
    """How one README command is checked: `server` (started, kept up for the clients), `client`
    (run against `server`, exit 0), `job` (run in the mirror, exit 0), or skipped with `why`."""

    prefix: str
    kind: str
    server: str = ""
    why: str = ""


README_COMMANDS = [
    Entry("make demo", "skip", why="the precondition: this test runs the demo's job itself (`run` below)"),
    Entry("make test", "skip", why="it is what runs this test"),
    Entry(".venv/bin/tensorfleet serve --model-repository examples/models --port 8001", "server", server="examples"),
    Entry(".venv/bin/tensorfleet serve --model-repository tests/models --port 8001 --http-port 8000", "server",
          server="tests"),
    Entry(".venv/bin/grpcurl -plaintext 127.0.0.1:8001 list", "client", server="examples"),
    Entry(".venv/bin/grpcurl -plaintext 127.0.0.1:8001 grpc.health.v1.Health/Check", "client", server="examples"),
    Entry(".venv/bin/grpcurl -plaintext -d '{\"name\": \"protein_embedder\"}'", "client", server="examples"),
    Entry(".venv/bin/grpcurl -plaintext -d '{\"model_name\": \"simple\"", "client", server="tests"),
    Entry("curl -s 127.0.0.1:8000/v2/health/ready", "client", server="tests"),
    Entry("curl -s 127.0.0.1:8000/v2/models/simple/infer", "client", server="tests"),
    Entry("curl -s 127.0.0.1:8000/v2/models/simple", "client", server="tests"),
    Entry(".venv/bin/tensorfleet run examples/jobs/protein-embeddings.yaml", "job"),
    Entry(".venv/bin/tensorfleet status examples/output/protein-embeddings.h5.tfjob", "job"),
    Entry(".venv/bin/tensorfleet embed /data/esm2_t6_8M_UR50D", "skip",
          why="needs a real ESM-2 checkpoint (no hub access here); tests/coordinator/test_embed_command.py runs "
              "the same command, --per-token and resume included, on a tiny EsmForMaskedLM saved by save_pretrained"),
]


def readme_commands(text: str) -> list[str]:
    """Each command of each ```bash block: continued lines joined, comments dropped, a quoted
    argument spanning lines kept whole."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            pending = f"{pending}\n{line}" if pending else line
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # a quote still open: the command goes on
                continue
            if words:
                commands.append(shlex.join(words))
            pending = ""
        assert not pending.strip(), f"unterminated command in README: {pending}"
    return commands


def entry_for(command: str) -> Entry | None:
    """The entry with the longest prefix of the command (as readme_commands joins its words)."""
    matches = [e for e in README_COMMANDS if command.startswith(e.prefix)]
    return max(matches, key=lambda e: len(e.prefix), default=None)


def test_every_readme_command_is_listed_with_how_it_is_checked():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 10, commands
    unlisted = [c for c in commands if entry_for(c) is None]
    assert not unlisted, f"README commands with no entry in README_COMMANDS (say how to run or why to skip): {unlisted}"
    used = {entry_for(c) for c in commands}
    stale = [e.prefix for e in README_COMMANDS if e not in used]
    assert not stale, f"README_COMMANDS entries the README no longer has: {stale}"
    for entry in README_COMMANDS:
        assert entry.kind != "skip" or entry.why, f"{entry.prefix}: a skipped command says why"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mirror(root: Path) -> None:
    """A checkout as `make demo` leaves it, minus what the commands write (examples/output)."""
    (root / "examples").mkdir()
    (root / "tests").mkdir()
    for name in ("models", "data"):
        (root / "examples" / name).symlink_to(REPO_ROOT / "examples" / name)
    shutil.copytree(REPO_ROOT / "examples" / "jobs", root / "examples" / "jobs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "tests" / "models").symlink_to(REPO_ROOT / "tests" / "models")
    (root / ".venv").symlink_to(REPO_ROOT / ".venv")


def _pointed(words: list[str], grpc: int, http: int | None) -> list[str]:
    out = []
    for word in words:
        word = word.replace("127.0.0.1:8001", f"127.0.0.1:{grpc}")
        if http is not None:
            word = word.replace("127.0.0.1:8000", f"127.0.0.1:{http}")
        out.append(word)
    return out


@pytest.mark.timeout(1500)  # the demo job: ~1.5 min on 2 idle cores, far longer on a loaded machine
def test_the_readme_commands_run_as_written(tmp_path):
    if not (REPO_ROOT / ".venv" / "bin" / "tensorfleet").exists():
        pytest.skip("no .venv in the checkout (make install)")
    if not (REPO_ROOT / "examples" / "models" / "protein_embedder" / "encoder.pt").exists():
        pytest.skip("the example model is not built (make models)")
    root = tmp_path / "checkout"
    root.mkdir()
    _mirror(root)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = [(c, entry_for(c)) for c in readme_commands(README.read_text())]
    servers: dict[str, tuple[subprocess.Popen, int, int | None]] = {}
    try:
        for command, entry in commands:
            if entry.kind != "server":
                continue
            words = shlex.split(command)
            http = _free_port() if "--http-port" in words else None
            port_at = words.index("--port") + 1
            words[port_at] = "0"
            if http is not None:
                words[words.index("--http-port") + 1] = str(http)
            port_file = tmp_path / f"{entry.server}.port"
            process, port = start_and_wait([*words, "--port-file", str(port_file)], port_file,
                                           tmp_path / f"{entry.server}.log", 180, env=env, cwd=root)
            servers[entry.server] = (process, port, http)
        for command, entry in commands:
            if entry.kind != "client":
                continue
            _, grpc, http = servers[entry.server]
            words = _pointed(shlex.split(command), grpc, http)
            done = subprocess.run(words, cwd=root, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0 and "error" not in done.stdout.lower(), f"{command}\n{done.stdout}\n{done.stderr}"
            print(f"ok: {command[:90]}")
    finally:
        stop_processes([process for process, _, _ in servers.values()], timeout=20)

    jobs = [(c, e) for c, e in commands if e.kind == "job"]
    for command, _ in jobs:
        done = subprocess.run(shlex.split(command), cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        print(f"ok: {command}")
    output = root / "examples" / "output" / "protein-embeddings.h5"
    assert output.is_file()
    run_command = jobs[0][0]
    started = time.monotonic()
    again = subprocess.run(shlex.split(run_command), cwd=root, env=env, capture_output=True, text=True, timeout=120)
    print(f"the same run again, finished: {time.monotonic() - started:.2f}s")
    assert again.returncode == 0 and f"output: {output}" in again.stdout, again.stdout + again.stderr
    assert "nothing computed" in again.stdout
