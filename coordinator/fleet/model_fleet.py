"""The servers of one model, started (or looked up) only when a run has work for them.

A plan needs the model's inputs and outputs, not a running server: for a local fleet they come
from the repository's config.yaml, so planning (and every check that can fail on the inputs)
happens before any server starts, and a resume of finished work starts none at all.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from tensorfleet.client import ConnectionOptions
from tensorfleet.core.auth import OPERATOR_SERVERS_ENV, SERVER_TOKEN_FILE_ENV, token_from

from ..spec import ModelSpec
from ..spec.errors import JobFatal
from .discovery import DiscoveryError, expand
from .model_info import FleetError, ModelInfo, inspect_fleet

if TYPE_CHECKING:
    from .local_fleet import LocalFleet


def config_model_info(model: ModelSpec) -> ModelInfo:
    """A local model's inputs and outputs from its config.yaml, read as plain YAML (no server)."""
    assert model.local is not None
    path = Path(model.local.repository) / model.name / "config.yaml"
    if not path.is_file():
        from .local_fleet import LocalFleet, LocalFleetError

        try:
            LocalFleet(Path(model.local.repository), model.name, 1, "cpu", Path("."), []).check()
        except LocalFleetError as error:
            raise JobFatal(str(error)) from None
        raise JobFatal(f"{path} does not exist")
    config = yaml.safe_load(path.read_text())

    def tensors(items: list[dict]) -> dict[str, tuple[str, list[int]]]:
        return {t["name"]: (t["datatype"], list(t.get("shape", []))) for t in items}

    return ModelInfo(
        name=model.name,
        version=str(config.get("version", "1")),
        max_batch_size=int(config.get("max_batch_size", 0)),
        inputs=tensors(config.get("inputs", [])),
        outputs=tensors(config.get("outputs", [])),
        optional_inputs={t["name"] for t in config.get("inputs", []) if t.get("optional")},
        precision=config.get("precision", "fp32"),
        token_budget=int((config.get("batching") or {}).get("token_budget", 0)),
        max_lengths={t["name"]: int(t["max_length"]) for t in config.get("inputs", []) if t.get("max_length")},
        sparse_inputs={t["name"] for t in config.get("inputs", []) if t.get("sparse") == "csr"},
        **_local_features(path.parent, config),
    )


def _local_features(model_dir: Path, config: dict) -> dict:
    """The model's feature list as a server reads it at load (config `features: {file, input}`)."""
    declared = config.get("features") or {}
    if not declared.get("file") or not (model_dir / declared["file"]).is_file():
        return {}
    names = [line.strip() for line in (model_dir / declared["file"]).read_text().splitlines() if line.strip()]
    inputs = [t["name"] for t in config.get("inputs", [])]
    return {"features": names, "features_input": declared.get("input") or (inputs[0] if len(inputs) == 1 else "")}


def operator_named(model: ModelSpec) -> bool:
    """Whether every server the job names is one the coordinator's operator named (`--servers`).

    A submitted job could name a listener of its submitter's: the operator's server token must
    never reach it (issue 28 #1). An entry is the operator's when it is one of their `--servers`
    entries as written, or an address those entries expand to now; a job's own `dns:` or
    `hostfile:` entry is not, since whoever writes the name or the file picks the addresses.
    Outside the service (no $TENSORFLEET_OPERATOR_SERVERS) a person runs their own job: True.
    Servers a job starts itself (`model.local`) require no token: False.
    """
    named = os.environ.get(OPERATOR_SERVERS_ENV)
    if named is None:
        return True
    if model.local is not None:
        return False
    entries = [entry.strip() for entry in named.split(",") if entry.strip()]
    try:
        addresses = set(expand(entries))
    except DiscoveryError:
        addresses = set()
    return bool(model.servers) and all(entry in entries or entry in addresses for entry in model.servers)


class ModelFleet:
    """One model's servers for one or more runs: a local fleet started on first use, or running servers.

    `info()` answers without starting anything; `start()` starts (once) and returns the ready servers.
    """

    def __init__(self, model: ModelSpec, workdir: Path, server_wait_s: float, label: str = "") -> None:
        self.model = model
        self.workdir = workdir
        self.server_wait_s = server_wait_s
        self.label = label
        self._local: LocalFleet | None = None
        self._planning: ModelInfo | None = None
        self._live: tuple[list[str], ModelInfo, dict[str, float]] | None = None

    @property
    def connection(self) -> ConnectionOptions:
        """The servers' token: the spec's, else the file in $TENSORFLEET_SERVER_TOKEN_FILE (the service's),
        which goes only to servers the service's operator named (`operator_named`)."""
        if self.model.token:
            return ConnectionOptions(token=self.model.token)
        server_token_file = os.environ.get(SERVER_TOKEN_FILE_ENV)
        if not server_token_file or not operator_named(self.model):
            return ConnectionOptions()
        return ConnectionOptions(token=token_from(None, server_token_file, use_env=False))

    @property
    def started(self) -> bool:
        return self._live is not None

    def _fatal(self, message: str) -> JobFatal:
        return JobFatal(f"{self.label}: {message}" if self.label else message)

    def info(self, wait_s: float | None = None) -> ModelInfo:
        """The model's inputs and outputs: config.yaml for a local fleet, else the running servers."""
        if self._live is not None:
            return self._live[1]
        if self._planning is None:
            if self.model.local is not None:
                self._planning = config_model_info(self.model)
            else:
                self._live = self._inspect(self._addresses(), wait_s or self.server_wait_s)
                self._planning = self._live[1]
        return self._planning

    def _addresses(self) -> list[str]:
        try:
            servers = expand(self.model.servers)
        except DiscoveryError as error:
            raise self._fatal(str(error)) from None
        if not servers:
            raise self._fatal(f"model.servers {self.model.servers} name no server right now; check the name or hostfile")
        return servers

    def _inspect(self, servers: list[str], wait_s: float) -> tuple[list[str], ModelInfo, dict[str, float]]:
        connection = self.connection
        try:
            info, ready = asyncio.run(inspect_fleet(servers, self.model.name, self.model.version, connection, wait_s))
        except FleetError as error:
            withheld = ""
            if connection.token is None and os.environ.get(SERVER_TOKEN_FILE_ENV) and not operator_named(self.model):
                withheld = (" (the coordinator sends its --server-token-file only to servers its operator named in "
                            "--servers; these are not among them)")
            raise self._fatal(f"{error}{withheld}") from None
        return servers, info, dict.fromkeys(ready, time.monotonic())

    def start(self) -> tuple[list[str], ModelInfo, dict[str, float]]:
        """(servers, the model as served, servers verified ready and when)."""
        if self._live is None:
            if self.model.local is not None:
                from .local_fleet import LocalFleet, LocalFleetError

                local = self.model.local
                self._local = LocalFleet(
                    Path(local.repository), self.model.name, local.count, local.device, self.workdir, local.args,
                    max_restarts=local.max_restarts, python=local.python, launcher=local.launcher,
                )
                try:
                    servers = self._local.start(local.startup_timeout_s)
                except LocalFleetError as error:
                    raise self._fatal(str(error)) from None
                self._check_protocol(servers, self._local.environment())
            else:
                servers = self._addresses()
            self._live = self._inspect(servers, self.server_wait_s)
        return self._live

    def _check_protocol(self, servers: list[str], environment: str) -> None:
        """Local servers may run from another environment with another tensorfleet: a server
        whose protocol version differs stops the job now (exit 2), both versions named."""
        from .protocol_check import ProtocolMismatch, check_protocol

        for address in servers:
            try:
                check_protocol(address, self.connection, where=environment)
            except ProtocolMismatch as error:
                self.stop()
                raise self._fatal(str(error)) from None

    def stalled(self, address: str) -> None:
        """A server answered nothing for policy.request_timeout_s: a local one is killed so that
        its supervisor starts it afresh (a model stuck on a batch holds its thread for good);
        running servers are someone else's to restart."""
        if self._local is not None:
            self._local.kill(address)

    @property
    def restarts(self) -> int:
        """Times local servers were started again after dying (fleet/local_fleet.py)."""
        return self._local.restarts if self._local is not None else 0

    def restart_note(self) -> str:
        """A line for the run's summary, or "" when no server died."""
        if not self.restarts:
            return ""
        return (f"local servers died or stalled and were started again {self.restarts} time(s) "
                f"(model.local.max_restarts {self.model.local.max_restarts}); their logs: {self.workdir}/server-*.log")

    def stop(self) -> None:
        if self._local is not None:
            self._local.stop()
            self._local = None
        if self.model.local is not None:
            self._live = None

    def describe(self) -> str:
        local = self.model.local
        if local is not None:
            return f"{local.count} local server(s) from {local.repository} on {local.device}"
        return ", ".join(self.model.servers)
