"""Render a kustomization the way `kustomize build` would, for the few features ours use.

The kustomize binary is not needed: resources (files and folders with their own
kustomization.yaml), namespace, labels (metadata only) and images are applied here. A
kustomization using anything else is rejected, so this renderer is never silently wrong.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "StorageClass"}


class KustomizeError(Exception):
    pass


def kustomization(folder: Path) -> dict[str, Any]:
    data = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(data) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{folder}/kustomization.yaml uses {sorted(unknown)}, which this renderer does not")
    return data


def listed_files(folder: Path) -> set[Path]:
    """Every file a kustomization (and those it includes) names, kustomization files included."""
    files = {folder / "kustomization.yaml"}
    for entry in kustomization(folder).get("resources", []):
        path = folder / entry
        files |= listed_files(path) if path.is_dir() else {path}
    return files


def pod_specs(resource: dict[str, Any]) -> list[dict[str, Any]]:
    spec = resource.get("spec", {})
    if resource["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [spec["template"]["spec"]]
    if resource["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if resource["kind"] == "Pod":
        return [spec]
    return []


def containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for pod in pod_specs(resource) for c in pod.get("initContainers", []) + pod.get("containers", [])]


def _image_name(image: str) -> str:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(last)] + last.split(":", 1)[0]


def render(folder: Path) -> list[dict[str, Any]]:
    folder = Path(folder)
    config = kustomization(folder)
    resources: list[dict[str, Any]] = []
    for entry in config.get("resources", []):
        path = folder / entry
        if path.is_dir():
            resources += render(path)
        elif path.is_file():
            resources += [copy.deepcopy(doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
        else:
            raise KustomizeError(f"{folder}/kustomization.yaml lists {entry}, which does not exist")
    for resource in resources:
        metadata = resource.setdefault("metadata", {})
        if config.get("namespace") and resource["kind"] not in CLUSTER_SCOPED:
            metadata["namespace"] = config["namespace"]
        for group in config.get("labels", []):
            if group.get("includeSelectors") or group.get("includeTemplates"):
                raise KustomizeError("labels with includeSelectors/includeTemplates are not supported here")
            metadata.setdefault("labels", {}).update(group["pairs"])
        for container in containers(resource):
            for image in config.get("images", []):
                if _image_name(container["image"]) == image["name"]:
                    new = image.get("newName", image["name"])
                    tag = image.get("newTag")
                    container["image"] = f"{new}:{tag}" if tag else new
    return resources
