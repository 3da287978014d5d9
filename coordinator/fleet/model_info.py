"""What the servers serve: the model's inputs, outputs, batch limit and provenance, checked once.

Everything comes over gRPC (ModelMetadata, ModelConfig and its parameters, RepositoryIndex).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from tensorfleet.client import AsyncInferenceClient, ConnectionOptions
from tensorfleet.core.errors import DeadlineExceeded, NotFound, TensorfleetError, Unavailable
from tensorfleet.core.sparse import PARAMETER_PREFIX as SPARSE_PARAMETER
from tensorfleet.protos import model_config_pb2 as mc


class FleetError(Exception):
    """No usable server, or servers that disagree: fatal, with what to fix."""


@dataclass
class ModelInfo:
    name: str
    version: str
    max_batch_size: int
    #: name -> (OIP datatype, row shape without the batch dim)
    inputs: dict[str, tuple[str, list[int]]]
    outputs: dict[str, tuple[str, list[int]]]
    optional_inputs: set[str] = field(default_factory=set)
    precision: str = ""
    artifact_sha256: str = ""
    token_budget: int = 0
    #: The model's feature list (names of `features_input`'s columns), if it declares one.
    features: list[str] = field(default_factory=list)
    features_input: str = ""
    #: input -> longest row it takes, for inputs that declare one.
    max_lengths: dict[str, int] = field(default_factory=dict)
    #: Inputs that take their rows as CSR (`sparse: csr`): sent as three tensors (core/sparse.py).
    sparse_inputs: set[str] = field(default_factory=set)

    def provenance(self) -> dict[str, str]:
        return {
            "model_name": self.name,
            "model_version": self.version,
            "model_artifact_sha256": self.artifact_sha256,
            "precision": self.precision,
        }


def _datatype(value: int) -> str:
    name = mc.DataType.Name(value).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


async def describe_model(address: str, model: str, version: str, options: ConnectionOptions) -> ModelInfo:
    async with AsyncInferenceClient(address, options=options, timeout=10.0) as client:
        try:
            config = await client.model_config(model, version)
        except NotFound:
            try:
                served = sorted({m.name for m in await client.repository_index()})
            except TensorfleetError:
                served = []
            raise FleetError(
                f"{address} does not serve model '{model}'"
                + (f" (it serves: {', '.join(served)})" if served else "")
                + "; fix model.name"
            ) from None
        params = {key: value.string_value for key, value in config.parameters.items()}
        batched = config.max_batch_size > 0
        return ModelInfo(
            name=config.name or model,
            version=params.get("version", version),
            max_batch_size=config.max_batch_size,
            inputs={i.name: (_datatype(i.data_type), list(i.dims)) for i in config.input},
            outputs={o.name: (_datatype(o.data_type), list(o.dims)) for o in config.output},
            optional_inputs={i.name for i in config.input if i.optional},
            precision=params.get("precision", ""),
            artifact_sha256=params.get("artifact_sha256", ""),
            token_budget=int(params.get("token_budget", "0") or 0) if batched else 0,
            features=params["features"].split("\n") if params.get("features") else [],
            features_input=params.get("features_input", ""),
            max_lengths={
                key.removeprefix("max_length."): int(value)
                for key, value in params.items() if key.startswith("max_length.") and value.isdigit()
            },
            sparse_inputs={
                key.removeprefix(SPARSE_PARAMETER) for key, value in params.items()
                if key.startswith(SPARSE_PARAMETER) and value == "csr"
            },
        )


class LoadFailure(str):
    """A problem that waiting will not fix: the server says the model failed to load (its reason)."""


async def load_failure(client: AsyncInferenceClient, model: str) -> LoadFailure | None:
    """The server's own reason when `model` failed to load there (RepositoryIndex: UNAVAILABLE)."""
    try:
        entries = await client.repository_index()
    except TensorfleetError:
        return None
    for entry in entries:
        if entry.name == model and entry.state == "UNAVAILABLE" and entry.reason:
            return LoadFailure(f"model '{model}' failed to load: {entry.reason}")
    return None


async def wait_serving(address: str, model: str, version: str, options: ConnectionOptions, timeout: float) -> str | None:
    """None once `address` is SERVING with the model ready, else the last problem seen (at once, a
    LoadFailure, when the server says the model failed to load)."""
    deadline = time.monotonic() + timeout
    problem = "not reachable"
    async with AsyncInferenceClient(address, options=options, timeout=3.0) as client:
        while True:
            try:
                if await client.health() == "SERVING":
                    if await client.is_model_ready(model, version):
                        return None
                    failed = await load_failure(client, model)
                    if failed is not None:
                        return failed
                    problem = f"model '{model}' not ready"
                else:
                    problem = "not SERVING"
            except NotFound:
                return None  # describe_model explains an unknown model better
            except TensorfleetError as error:
                problem = error.message.splitlines()[0] if error.message else type(error).__name__
            if time.monotonic() >= deadline:
                return problem
            await asyncio.sleep(0.2)


async def inspect_fleet(
    servers: list[str], model: str, version: str, options: ConnectionOptions, timeout: float
) -> tuple[ModelInfo, list[str]]:
    """The model as served, and which servers answered. FleetError when none did or they disagree."""
    answers = await asyncio.gather(*(serving_model(s, model, version, options, timeout) for s in servers))
    described = [(s, a) for s, a in zip(servers, answers, strict=True) if isinstance(a, ModelInfo)]
    if not described:
        detail = "; ".join(f"{s}: {a}" for s, a in zip(servers, answers, strict=True))
        if any(isinstance(a, LoadFailure) for a in answers):
            raise FleetError(f"the servers could not load model '{model}' ({detail}); fix the model (or its "
                             "config.yaml and artifacts) and load it again, or name another model")
        raise FleetError(
            f"no server reachable after {timeout:.0f}s ({detail}). "
            f"Start servers (tensorfleet serve ...) or fix model.servers / --servers"
        )
    ready = [s for s, _ in described]
    infos = [info for _, info in described]
    first = infos[0]
    for address, info in zip(ready[1:], infos[1:], strict=True):
        if (info.artifact_sha256, info.version, info.precision) != (first.artifact_sha256, first.version, first.precision):
            raise FleetError(
                f"servers disagree about model '{model}': {ready[0]} has version {first.version} "
                f"{first.precision} sha256 {first.artifact_sha256[:12]}, {address} has version {info.version} "
                f"{info.precision} sha256 {info.artifact_sha256[:12]}; serve one model build everywhere"
            )
    if first.max_batch_size < 1:
        raise FleetError(f"model '{model}' has max_batch_size 0 (unbatched); the coordinator sends row batches")
    return first, ready


async def serving_model(
    address: str, model: str, version: str, options: ConnectionOptions, timeout: float
) -> ModelInfo | str:
    """The model as `address` serves it, or the last problem seen within `timeout`.

    A connection that drops between the health check and the description (a server restarting,
    a proxy resetting) is retried like one that was never up, not fatal (found by bench.chaos).
    """
    deadline = time.monotonic() + timeout
    while True:
        problem = await wait_serving(address, model, version, options, max(0.0, deadline - time.monotonic()))
        if problem is not None:
            return problem  # a LoadFailure at once, anything else after waiting the whole timeout
        try:
            return await describe_model(address, model, version, options)
        except (Unavailable, DeadlineExceeded) as error:
            problem = error.message.splitlines()[0] if error.message else type(error).__name__
        if time.monotonic() >= deadline:
            return problem
        await asyncio.sleep(0.2)
