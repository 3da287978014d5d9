"""What an output says about how it was made: written by every writer (HDF5 attributes,
parquet metadata, .h5ad uns, a CSV's provenance file).

Two outputs that differ in anything that changes their values must say so here: the model's
build, the per-job model parameters sent with every request (e.g. STACK's diffusion steps),
how the input was fitted to the model (gene alignment coverage, over-length and duplicate-id
policies, what they did), batching and the inputs' digests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tensorfleet.core.version import __version__ as tensorfleet_version

from ..fleet.model_info import ModelInfo
from ..spec import JobSpec
from .manifest import Manifest


def run_facts(manifest: Manifest) -> dict[str, Any]:
    """A run's own facts from its manifest: the model it ran, its parameters, how its input was fitted."""
    return {
        **(manifest.meta("model") or {}),
        "model_parameters": manifest.plan_settings().get("model_parameters", {}),
        **(manifest.meta("input_report") or {}),
    }


def output_provenance(
    spec: JobSpec, manifest: Manifest, info: ModelInfo | None, extra: Callable[[], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The provenance of a run's merged output; `extra` adds a workflow's own (e.g. every stage's)."""
    settings = manifest.plan_settings()
    return {
        "tensorfleet_version": tensorfleet_version,
        **(manifest.meta("model") or (info.provenance() if info else {})),
        "spec_sha256": manifest.meta("spec_sha256", spec.digest()),
        "job_name": spec.name,
        "servers": manifest.servers(),
        "inputs": [{"path": i.path, "size": i.size, "sha256": i.sha256} for i in manifest.inputs()],
        "batch_rows": settings.get("batch_rows"),
        "token_budget": settings.get("token_budget"),
        # what the chunks were computed with (the plan's), {} when the job sends none
        "model_parameters": settings.get("model_parameters", {}),
        "over_length_policy": spec.input.over_length,
        "duplicate_ids_policy": spec.input.duplicate_ids,
        **(manifest.meta("input_report") or {}),
        **(extra() if extra is not None else {}),
    }
