"""The Kubernetes manifests: rendered like `kustomize build`, validated offline against real
Kubernetes API schemas (PyPI kubernetes-validate), and checked against the server's own flags
(the container args must parse with `tensorfleet serve`'s parser; probe and port numbers must
be the ones those args set) and against each other (Service selectors, claims, addresses).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tensorfleet.coordinator.spec import parse_spec
from tensorfleet.services.cli import build_parser
from tests.deploy.kustomize import containers, listed_files, pod_specs, render
from tests.serving import REPO_ROOT

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

BASE = REPO_ROOT / "deploy" / "kubernetes"
EXAMPLE = BASE / "example"
SHARDED = BASE / "sharded"  # checked further in test_kubernetes_shards.py
# The oldest API we claim (native gRPC probes are GA since 1.27) and the newest schemas shipped.
API_VERSIONS = ["1.29.0", "1.37.0"]


def _one(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _named_port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container.get("ports", []) if p["name"] == name)


def _resolve_target(service_port: dict[str, Any], container: dict[str, Any]) -> int:
    target = service_port.get("targetPort", service_port["port"])
    return _named_port(container, target) if isinstance(target, str) else target


# ------------------------------------------------------------------ checks (each returns problems)


def server_problems(resources: list[dict[str, Any]]) -> list[str]:
    """The model server StatefulSet against `tensorfleet serve`'s flags and its headless Service."""
    problems: list[str] = []
    statefulset = _one(resources, "StatefulSet")
    (container,) = containers(statefulset)
    command, args = container.get("command", []), container.get("args", [])
    if command[-1:] != ["serve"]:
        problems.append(f"server command {command} does not end in `serve`")
    parsed = build_parser().parse_args([str(a) for a in args])  # SystemExit (a failure) if it does not parse
    if parsed.port != _named_port(container, "grpc"):
        problems.append(f"--port {parsed.port} but containerPort grpc is {_named_port(container, 'grpc')}")
    if parsed.metrics_port != _named_port(container, "metrics"):
        problems.append(f"--metrics-port {parsed.metrics_port} but containerPort metrics is "
                        f"{_named_port(container, 'metrics')}")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if not probe or "grpc" not in probe:
            problems.append(f"{kind} is not a native gRPC probe")
        elif probe["grpc"]["port"] != parsed.port or probe["grpc"].get("service", ""):
            problems.append(f"{kind} checks {probe['grpc']}, the server's health is on --port {parsed.port}")
    if parsed.device != "cuda:0":
        problems.append(f"--device {parsed.device}: a pod sees its one GPU as cuda:0")
    if str(container["resources"]["limits"].get("nvidia.com/gpu")) != "1":
        problems.append("each server pod must limit nvidia.com/gpu to 1")
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    if str(parsed.model_repository) not in mounts:
        problems.append(f"--model-repository {parsed.model_repository} is not a volume mount")
    startup = container.get("startupProbe", {})
    if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 300:
        problems.append("the startup probe gives model loading under 5 minutes")
    grace = pod_specs(statefulset)[0].get("terminationGracePeriodSeconds", 30)
    if grace <= parsed.drain_seconds:
        problems.append(f"terminationGracePeriodSeconds {grace} must exceed --drain-seconds {parsed.drain_seconds}")

    service = _one(resources, "Service", statefulset["spec"]["serviceName"])
    if service["spec"].get("clusterIP") != "None":
        problems.append("the servers' Service must be headless (clusterIP: None)")
    if service["spec"].get("publishNotReadyAddresses"):
        problems.append("the headless Service must list only ready (SERVING) servers")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    if not service["spec"]["selector"].items() <= labels.items():
        problems.append(f"Service selector {service['spec']['selector']} does not match pods {labels}")
    if not statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items():
        problems.append("StatefulSet selector does not match its pod labels")
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    if _resolve_target(grpc_port, container) != parsed.port:
        problems.append(f"Service grpc port targets {grpc_port.get('targetPort')}, not --port {parsed.port}")
    claims = {r["metadata"]["name"] for r in resources if r["kind"] == "PersistentVolumeClaim"}
    for volume in pod_specs(statefulset)[0].get("volumes", []):
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        if claim and claim not in claims:
            problems.append(f"volume {volume['name']} claims {claim}, which is not in the render")
    return problems


def coordinator_problems(resources: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    deployment = _one(resources, "Deployment", "coordinator")
    (container,) = containers(deployment)
    if container["command"][-2:] != ["coordinator", "serve"]:
        problems.append(f"coordinator command {container['command']} is not `tensorfleet coordinator serve`")
    args = [str(a) for a in container["args"]]
    port = int(args[args.index("--port") + 1])
    state_dir = args[args.index("--state-dir") + 1]
    if port != _named_port(container, "grpc"):
        problems.append(f"--port {port} is not containerPort grpc")
    for kind in ("readinessProbe", "livenessProbe"):
        if container.get(kind, {}).get("grpc", {}).get("port") != port:
            problems.append(f"coordinator {kind} is not a gRPC probe on --port {port}")
    mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
    if not any(state_dir == m or state_dir.startswith(m.rstrip("/") + "/") for m in mounts):
        problems.append(f"--state-dir {state_dir} is not on a volume: jobs would vanish with the pod")
    claims = {r["metadata"]["name"] for r in resources if r["kind"] == "PersistentVolumeClaim"}
    volumes = pod_specs(deployment)[0].get("volumes", [])
    if not any(v.get("persistentVolumeClaim", {}).get("claimName") in claims for v in volumes):
        problems.append("the coordinator has no PersistentVolumeClaim for its job folders")
    if deployment["spec"].get("replicas", 1) != 1 or deployment["spec"]["strategy"]["type"] != "Recreate":
        problems.append("one coordinator at a time (replicas 1, strategy Recreate): its state is one SQLite file")
    service = _one(resources, "Service", "coordinator")
    if _resolve_target(service["spec"]["ports"][0], container) != port:
        problems.append("the coordinator Service does not reach --port")
    return problems


def example_problems(base: list[dict[str, Any]], example: list[dict[str, Any]]) -> list[str]:
    """The example Job submits to the coordinator Service; its job file names the headless Service."""
    problems: list[str] = []
    job = _one(example, "Job")
    (container,) = containers(job)
    command = [str(c) for c in container["command"]]
    if "submit" not in command or "--wait" not in command:
        problems.append(f"{command} is not `tensorfleet submit ... --wait`")
    address = command[command.index("--coordinator") + 1]
    host, _, port = address.rpartition(":")
    service = _one(base, "Service", host)
    if int(port) not in [p["port"] for p in service["spec"]["ports"]]:
        problems.append(f"--coordinator {address}: Service {host} has no port {port}")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (volume,) = [v for v in pod_specs(job)[0]["volumes"] if "configMap" in v]
    configmap = _one(example, "ConfigMap", volume["configMap"]["name"])
    (filename,) = configmap["data"]
    job_path = command[command.index("submit") + 1]
    if job_path != f"{mounts[volume['name']]}/{filename}":
        problems.append(f"submit reads {job_path}, the ConfigMap is mounted as {mounts[volume['name']]}/{filename}")
    spec = parse_spec(yaml.safe_load(configmap["data"][filename]), "example job")
    headless = {r["metadata"]["name"]: r for r in base if r["kind"] == "Service" and r["spec"].get("clusterIP") == "None"}
    for server in spec.model.servers:
        if not server.startswith("dns:"):
            problems.append(f"model.servers {server} is one address; use dns:NAME:PORT to follow every pod")
            continue
        name, _, server_port = server.removeprefix("dns:").rpartition(":")
        if name not in headless or int(server_port) not in [p["port"] for p in headless[name]["spec"]["ports"]]:
            problems.append(f"model.servers {server} is not the headless servers' Service and port")
    return problems


# ------------------------------------------------------------------ tests


def test_every_manifest_file_is_in_a_kustomization() -> None:
    on_disk = {p for p in BASE.rglob("*") if p.suffix in (".yaml", ".yml")}
    listed = listed_files(BASE) | listed_files(EXAMPLE) | listed_files(SHARDED)
    assert on_disk == listed, f"not listed: {sorted(on_disk - listed)}; missing: {sorted(listed - on_disk)}"


@pytest.mark.parametrize("version", API_VERSIONS)
@pytest.mark.parametrize("folder", [BASE, EXAMPLE, SHARDED], ids=["base", "example", "sharded"])
def test_manifests_validate_against_the_kubernetes_api_schema(folder: Path, version: str) -> None:
    resources = render(folder)
    assert resources
    for resource in resources:
        kubernetes_validate.validate(resource, version, strict=True)  # raises on any schema error
    for resource in resources:  # kustomize rewrote every image to a real reference
        for container in containers(resource):
            assert container["image"].startswith("registry.example.com/tensorfleet:"), container["image"]
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == "tensorfleet"


def test_the_schema_check_is_strict() -> None:
    statefulset = copy.deepcopy(_one(render(BASE), "StatefulSet"))
    statefulset["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] = {"grcp": {"port": 8001}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, API_VERSIONS[-1], strict=True)


def test_server_ports_and_probes_match_the_server_flags() -> None:
    assert server_problems(render(BASE)) == []


def test_coordinator_deployment_is_consistent() -> None:
    assert coordinator_problems(render(BASE)) == []


def test_example_job_submits_to_the_coordinator_and_uses_the_fleet() -> None:
    assert example_problems(render(BASE), render(EXAMPLE)) == []


def test_the_flag_checks_catch_a_probe_on_the_wrong_port() -> None:
    resources = render(BASE)
    container = containers(_one(resources, "StatefulSet"))[0]
    container["livenessProbe"]["grpc"]["port"] = 8002
    args = container["args"]
    args[args.index("--metrics-port") + 1] = "9090"
    problems = server_problems(resources)
    assert any(p.startswith("livenessProbe checks") for p in problems)
    assert any(p.startswith("--metrics-port 9090") for p in problems)
    container["args"] = [*args, "--no-such-flag"]
    with pytest.raises(SystemExit):
        server_problems(resources)


def auth_problems(resources: list[dict[str, Any]]) -> list[str]:
    """Every tensorfleet container that listens beyond loopback or talks to one carries a token file
    from a mounted Secret (secure by default, issue 11)."""
    problems: list[str] = []
    for resource in resources:
        for container in containers(resource):
            words = [str(w) for w in [*container.get("command", []), *container.get("args", [])]]
            if "tensorfleet" not in words[:1]:
                continue
            secret_mounts = {
                m["mountPath"] for m in container.get("volumeMounts", [])
                if any(v["name"] == m["name"] and "secret" in v for v in pod_specs(resource)[0].get("volumes", []))
            }
            if "--token-file" not in words:
                problems.append(f"{resource['metadata']['name']}: no --token-file")
                continue
            path = words[words.index("--token-file") + 1]
            if not any(path.startswith(m.rstrip("/") + "/") for m in secret_mounts):
                problems.append(f"{resource['metadata']['name']}: --token-file {path} is not on a Secret volume")
    return problems


def test_every_listener_and_client_uses_a_token_from_a_secret() -> None:
    assert auth_problems(render(BASE)) == []
    assert auth_problems(render(EXAMPLE)) == []
    broken = render(BASE)
    container = containers(_one(broken, "StatefulSet"))[0]
    at = container["args"].index("--token-file")
    del container["args"][at:at + 2]
    assert any("no --token-file" in p for p in auth_problems(broken))
