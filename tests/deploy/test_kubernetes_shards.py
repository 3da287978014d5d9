"""deploy/kubernetes/sharded: one job as an Indexed Job of N shard pods and a merge Job after it.

Validated offline against the Kubernetes API schemas (PyPI kubernetes-validate, in
test_kubernetes.py with the other folders), and here for what a schema cannot say: pod I runs
`tensorfleet run JOB --shard $(JOB_COMPLETION_INDEX)/N` with N = completions = parallelism, the
arguments parse with tensorfleet's own parser, the job file (its ConfigMap) is a valid job whose
input, job folder and output are on the volume every pod shares (ReadWriteMany), and the merge
Job runs `tensorfleet merge --wait` on the same file and volume.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tensorfleet.coordinator.cli.commands import add_commands
from tensorfleet.coordinator.spec.kinds import parse_job
from tests.deploy.kustomize import containers, pod_specs, render
from tests.serving import REPO_ROOT

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

SHARDED = REPO_ROOT / "deploy" / "kubernetes" / "sharded"
INDEX = "$(JOB_COMPLETION_INDEX)"


def _parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tensorfleet")
    add_commands(parser.add_subparsers(dest="command", required=True), full=False)
    return parser.parse_args(args)


def _jobs(resources: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    jobs = [r for r in resources if r["kind"] == "Job"]
    indexed = [j for j in jobs if j["spec"].get("completionMode") == "Indexed"]
    others = [j for j in jobs if j not in indexed]
    assert len(indexed) == 1 and len(others) == 1, [j["metadata"]["name"] for j in jobs]
    return indexed[0], others[0]


def _mounts(job: dict[str, Any], resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """mount path -> the volume behind it (its claim or ConfigMap resource)."""
    (container,) = containers(job)
    volumes = {v["name"]: v for v in pod_specs(job)[0]["volumes"]}
    by_name = {(r["kind"], r["metadata"]["name"]): r for r in resources}
    out = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "persistentVolumeClaim" in volume:
            out[mount["mountPath"]] = by_name.get(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]),
                                                  {"kind": "PersistentVolumeClaim", "external": True})
        elif "configMap" in volume:
            out[mount["mountPath"]] = by_name[("ConfigMap", volume["configMap"]["name"])]
        else:
            out[mount["mountPath"]] = volume
    return out


def sharding_problems(resources: list[dict[str, Any]]) -> list[str]:
    """What would make the shards not one job: each problem one line."""
    problems: list[str] = []
    shards, merge = _jobs(resources)
    spec = shards["spec"]
    (container,) = containers(shards)
    args = [str(a) for a in [*container.get("command", []), *container.get("args", [])]]
    if args[:2] != ["tensorfleet", "run"]:
        return [f"the shard pods run {args}, not `tensorfleet run`"]
    parsed = _parse(args[1:])
    index, _, count = (parsed.shard or "").partition("/")
    if index != INDEX:
        problems.append(f"--shard {parsed.shard}: I must be {INDEX}")
    if not count.isdigit() or int(count) != spec.get("completions") or spec.get("parallelism") != spec.get("completions"):
        problems.append(f"--shard .../{count} but completions {spec.get('completions')}, parallelism {spec.get('parallelism')}")
    if pod_specs(shards)[0].get("restartPolicy") != "Never" or "backoffLimitPerIndex" not in spec:
        problems.append("a failed shard pod must be retried on its own index (restartPolicy Never, backoffLimitPerIndex)")
    (merger,) = containers(merge)
    merge_args = [str(a) for a in [*merger.get("command", []), *merger.get("args", [])]]
    merged = _parse(merge_args[1:])
    if merged.command != "merge" or not merged.wait or merged.job != parsed.job:
        problems.append(f"the merge Job runs {merge_args}, not `tensorfleet merge {parsed.job} --wait`")
    for job in (shards, merge):
        mounts = _mounts(job, resources)
        holder = next((path for path in mounts if str(parsed.job).startswith(path.rstrip("/") + "/")), None)
        if holder is None or mounts[holder].get("kind") != "ConfigMap":
            problems.append(f"{job['metadata']['name']}: {parsed.job} is not on the job file's ConfigMap")
            continue
        text = mounts[holder]["data"][Path(str(parsed.job)).name]
        job_spec = parse_job(yaml.safe_load(text), "sharded job", Path("/"))
        paths = {"input": job_spec.input.path, "output": job_spec.output.path, "job_dir": job_spec.job_dir}
        for what, path in paths.items():
            shared = next((m for m in mounts if str(path).startswith(m.rstrip("/") + "/")), None)
            claim = mounts.get(shared or "", {})
            if claim.get("kind") != "PersistentVolumeClaim" or "ReadWriteMany" not in claim.get("spec", {}).get(
                    "accessModes", []):
                problems.append(f"{job['metadata']['name']}: {what} {path} is not on a ReadWriteMany volume")
        local = job_spec.model.local
        if job is shards and local is not None and not any(str(local.repository).startswith(m) for m in mounts):
            problems.append(f"model.local.repository {local.repository} is not mounted in the shard pods")
    return problems


def test_the_shards_are_an_indexed_job_of_one_job_and_a_merge_after_them() -> None:
    assert sharding_problems(render(SHARDED)) == []


def test_the_checks_catch_a_shard_count_that_disagrees_and_a_private_job_folder() -> None:
    resources = render(SHARDED)
    broken = copy.deepcopy(resources)
    shards, _ = _jobs(broken)
    shards["spec"]["completions"] = 4
    assert any("completions 4" in p for p in sharding_problems(broken))
    broken = copy.deepcopy(resources)
    claim = next(r for r in broken if r["kind"] == "PersistentVolumeClaim")
    claim["spec"]["accessModes"] = ["ReadWriteOnce"]
    assert any("not on a ReadWriteMany volume" in p for p in sharding_problems(broken))
    broken = copy.deepcopy(resources)
    shards, _ = _jobs(broken)
    containers(shards)[0]["args"][-1] = "0/3"
    assert any("I must be" in p for p in sharding_problems(broken))


def test_the_schema_check_rejects_a_misspelt_completion_mode() -> None:
    shards, _ = _jobs(render(SHARDED))
    shards = copy.deepcopy(shards)
    shards["spec"]["completionMod"] = shards["spec"].pop("completionMode")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(shards, "1.37.0", strict=True)
