"""Dockerfiles, the Apptainer definition and the compose fleet, checked without docker (it
cannot run here): every file they copy exists and covers every package the project installs;
torch is pinned; the commands they run parse with the real command-line parsers; the compose
services, ports, health checks and example job agree with each other.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from tensorfleet.coordinator.spec import parse_spec
from tensorfleet.services.cli import build_parser
from tests.serving import REPO_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

DEPLOY = REPO_ROOT / "deploy"
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile.cpu", DEPLOY / "docker" / "Dockerfile.cuda"]
APPTAINER = DEPLOY / "apptainer" / "tensorfleet.def"
COMPOSE = DEPLOY / "compose.yaml"
TORCH = r"(?<![\w\[,/.-])torch\b[^\s\"]*"  # a torch requirement, not the [torch] extra


def _package_folders() -> set[str]:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return {folder.split("/")[0] for folder in pyproject["tool"]["setuptools"]["package-dir"].values()}


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def _apptainer_sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {"header": []}
    current = "header"
    for line in APPTAINER.read_text().splitlines():
        if line.startswith("%"):
            current = line.split()[0][1:]
            sections[current] = []
        elif line.strip() and not line.lstrip().startswith("#"):
            sections[current].append(line.strip())
    return sections


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_every_package_and_pins_torch(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    copied = set()
    for keyword, args in steps:
        if keyword == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
                copied.add(source)
    assert _package_folders() <= copied, f"not copied: {_package_folders() - copied}"
    assert {"pyproject.toml", "README.md"} <= copied  # what `pip install .` reads
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    torch_specs = re.findall(TORCH, runs)
    assert torch_specs and all(spec == "torch==2.13.0" for spec in torch_specs), torch_specs
    assert 'pip install ".[torch,io]"' in runs
    entrypoint = json.loads(next(args for keyword, args in steps if keyword == "ENTRYPOINT"))
    assert entrypoint == ["tensorfleet"]
    command = json.loads(next(args for keyword, args in steps if keyword == "CMD"))
    assert command[0] == "serve"
    args = build_parser().parse_args(command[1:])
    assert str(args.model_repository) == "/models"
    user = [args for keyword, args in steps if keyword == "USER"]
    assert user and user[-1] != "root", "the image must not run as root"
    exposed = {int(port) for keyword, args in steps if keyword == "EXPOSE" for port in args.split()}
    assert {args.port, args.metrics_port} <= exposed
    if dockerfile.name.endswith("cuda"):
        base = next(args for keyword, args in steps if keyword == "ARG" and args.startswith("CUDA_IMAGE="))
        assert base.removeprefix("CUDA_IMAGE=").startswith("nvidia/cuda:")
        assert args.device == "cuda:0"
    else:
        assert args.device == "cpu"


def test_apptainer_definition_copies_every_package_and_runs_tensorfleet() -> None:
    sections = _apptainer_sections()
    header = dict(line.split(":", 1) for line in sections["header"])
    assert header["Bootstrap"].strip() == "docker"
    assert header["From"].strip().startswith("nvidia/cuda:")
    copied = set()
    for line in sections["files"]:
        source, destination = line.split()
        assert (REPO_ROOT / source).exists(), f"%files {source} does not exist"
        assert destination.startswith("/opt/tensorfleet/")
        copied.add(source)
    assert _package_folders() | {"pyproject.toml", "README.md"} <= copied
    post = " ".join(sections["post"])
    assert re.findall(TORCH, post) == ["torch==2.13.0"]
    assert sections["runscript"] == ['exec tensorfleet "$@"']
    assert any("tensorfleet.services --help" in line for line in sections["test"])


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # YAML merge keys (<<) resolve here as in compose


def _container_port(mapping: str) -> tuple[str, int]:
    *host, container = mapping.split(":")
    return ":".join(host), int(container)


def test_compose_servers_run_the_server_with_its_own_flags() -> None:
    compose = _compose()
    servers = {name: s for name, s in compose["services"].items() if s["command"][0] == "serve"}
    assert len(servers) == 2
    for name, service in servers.items():
        args = build_parser().parse_args(service["command"][1:])
        assert args.device == "cpu"
        published = dict(_container_port(p)[::-1] for p in service["ports"])
        assert args.port in published and args.metrics_port in published, f"{name}: {service['ports']}"
        assert all(host.startswith("127.0.0.1:") for host in published.values()), "publish on loopback only"
        host_path, container_path, *_ = service["volumes"][0].split(":")
        assert container_path == str(args.model_repository)
        assert (COMPOSE.parent / host_path).resolve() == REPO_ROOT / "examples" / "models"
        health = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{args.port}" in health and "SERVING" in health
        dockerfile = COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]
        assert dockerfile.resolve() in [p.resolve() for p in DOCKERFILES]
    host_ports = [_container_port(p)[0] for s in compose["services"].values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"


def test_compose_coordinator_waits_for_healthy_servers_and_keeps_jobs_on_a_volume() -> None:
    compose = _compose()
    coordinator = compose["services"]["coordinator"]
    assert coordinator["command"][:2] == ["coordinator", "serve"]
    args = coordinator["command"]
    port = int(args[args.index("--port") + 1])
    state_dir = args[args.index("--state-dir") + 1]
    assert any(_container_port(p)[1] == port for p in coordinator["ports"])
    servers = [name for name, s in compose["services"].items() if s["command"][0] == "serve"]
    assert coordinator["depends_on"] == {name: {"condition": "service_healthy"} for name in servers}
    volumes = {v.split(":")[1]: v.split(":")[0] for v in coordinator["volumes"]}
    assert any(state_dir.startswith(mount) for mount in volumes), "coordinator state must be on a volume"
    assert volumes["/jobs"] in compose["volumes"]


def test_compose_example_job_targets_the_compose_servers() -> None:
    compose = _compose()
    spec = parse_spec(yaml.safe_load((DEPLOY / "jobs" / "compose-protein-embeddings.yaml").read_text()))
    for address in spec.model.servers:
        name, _, port = address.rpartition(":")
        args = build_parser().parse_args(compose["services"][name]["command"][1:])
        assert args.port == int(port)
    # the input path is the repository's example data, as mounted into the coordinator
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["coordinator"]["volumes"])
    host = mounts["/examples"]
    relative = Path(spec.input.path).relative_to("/examples")
    assert (COMPOSE.parent / host / relative).resolve().parent.is_dir()
    assert (REPO_ROOT / "examples" / "models" / spec.model.name / "config.yaml").is_file()
