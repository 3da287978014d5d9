"""The model repository: one folder per model, loaded once and kept loaded.

A model that fails to load (bad config, missing artifact, checksum mismatch, backend
error) is recorded as UNAVAILABLE with its reason; the other models keep serving.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from tensorfleet.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TensorfleetError,
)
from tensorfleet.core.hashing import file_sha256

from ..backends import create_backend
from ..backends.base import Backend, ModelContext
from ..model_config import CONFIG_FILENAME, ModelConfig, load_config, read_features
from ..validation import example_inputs
from ..warmup import warm_shapes

log = logging.getLogger("tensorfleet.repository")


class ModelState(str, Enum):
    UNLOADED = "UNLOADED"
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ModelEntry:
    name: str
    state: ModelState = ModelState.UNLOADED
    reason: str = ""
    config: ModelConfig | None = None
    backend: Backend | None = None
    checksum: str = ""  # sha256 over the artifacts' digests: one fingerprint for provenance
    features: list[str] = field(default_factory=list)  # config.features, read at load
    loaded_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def verify_artifacts(model_dir: Path, config: ModelConfig) -> str:
    """Check every declared artifact exists and matches its sha256; return one fingerprint
    over the config file and the artifacts, recorded as the model's provenance."""
    combined = hashlib.sha256()
    combined.update(f"{CONFIG_FILENAME}:{file_sha256(model_dir / CONFIG_FILENAME)}\n".encode())
    for name, expected in sorted(config.artifacts.items()):
        path = model_dir / name
        if not path.is_file():
            raise InvalidArgument(f"model '{config.name}': artifact {name} is missing from {model_dir}")
        actual = file_sha256(path)
        if actual != expected.lower():
            raise InvalidArgument(
                f"model '{config.name}': artifact {name} has sha256 {actual}, config expects {expected}"
            )
        combined.update(f"{name}:{actual}\n".encode())
    if config.features is not None and (model_dir / config.features.file).is_file():
        combined.update(f"features:{config.features.file}:{file_sha256(model_dir / config.features.file)}\n".encode())
    return combined.hexdigest()


MAX_MODEL_NAME = 255


def check_model_name(name: str) -> None:
    """A model name is one folder of the repository: never a path that leaves it."""
    if not name:
        return  # unknown, not dangerous: NOT_FOUND below, as for any name the repository lacks
    if len(name) > MAX_MODEL_NAME or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise InvalidArgument(
            f"model name {name[:64]!r} is not a folder name in the repository (at most {MAX_MODEL_NAME} characters, "
            "no '/', '\\', NUL, '.' or '..')"
        )


class ModelRepository:
    """Discovers, loads and unloads models. Loading runs in the caller's thread."""

    def __init__(self, root: Path, device: str = "cpu", only: list[str] | None = None) -> None:
        self.root = Path(root)
        self.device = device
        self.only = set(only or [])
        self._entries: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()
        if not self.root.is_dir():
            raise NotFound(f"model repository {self.root} is not a directory")
        for name in self.discover():
            self._entries[name] = ModelEntry(name=name)

    def discover(self) -> list[str]:
        names = sorted(
            child.name
            for child in self.root.iterdir()
            if child.is_dir() and (child / CONFIG_FILENAME).exists()
        )
        return [name for name in names if not self.only or name in self.only]

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            for name in self.discover():  # folders added since start show up in the index
                self._entries.setdefault(name, ModelEntry(name=name))
            return [self._entries[name] for name in sorted(self._entries)]

    def entry(self, name: str) -> ModelEntry:
        check_model_name(name)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None and (self.root / name / CONFIG_FILENAME).exists():
                entry = self._entries[name] = ModelEntry(name=name)
        if entry is None:
            raise NotFound(f"unknown model '{name}'; this server has {sorted(self._entries)}")
        return entry

    def ready(self, name: str, version: str = "") -> ModelEntry:
        """The entry of a loaded model, or NotFound / FailedPrecondition saying why not.

        An empty version means the one loaded; any other must match it."""
        entry = self.entry(name)
        if entry.state is not ModelState.READY:
            detail = f": {entry.reason}" if entry.reason else ""
            raise FailedPrecondition(f"model '{name}' is {entry.state.value}{detail}")
        assert entry.config is not None
        if version and version != entry.config.version:
            raise NotFound(f"model '{name}' has no version '{version}'; it serves version '{entry.config.version}'")
        return entry

    def load(self, name: str) -> ModelEntry:
        """(Re)load one model. Failures are recorded on the entry and re-raised."""
        entry = self.entry(name)
        with entry.lock:
            if entry.backend is not None:
                self._release(entry)
            entry.state, entry.reason = ModelState.LOADING, ""
            started = time.monotonic()
            try:
                model_dir = self.root / name
                config = load_config(model_dir)
                checksum = verify_artifacts(model_dir, config)
                features = read_features(model_dir, config)
                context = ModelContext(
                    model_dir=model_dir,
                    config=config,
                    device=self.device,
                    precision=config.precision,
                    parameters=dict(config.parameters),
                )
                backend = create_backend(context)
                backend.load()
                if backend.fingerprint():  # a checkpoint outside the folder: its config + weights too
                    checksum = hashlib.sha256(f"{checksum}\n{backend.fingerprint()}\n".encode()).hexdigest()
                backend.warmup()
                for example in config.warmup:
                    backend.predict(example_inputs(config, example))
                warm_shapes(config, backend)
            except Exception as error:  # any failure makes this model unavailable, not the server
                entry.state = ModelState.UNAVAILABLE
                entry.reason = error.message if isinstance(error, TensorfleetError) else f"{type(error).__name__}: {error}"
                log.error("model %s failed to load: %s", name, entry.reason)
                raise
            entry.config, entry.backend, entry.checksum, entry.features = config, backend, checksum, features
            entry.state, entry.loaded_at = ModelState.READY, time.time()
            log.info("model %s loaded on %s in %.2fs", name, self.device, time.monotonic() - started)
            return entry

    def load_all(self) -> None:
        for entry in self.entries():
            try:
                self.load(entry.name)
            except Exception:  # recorded on the entry; keep loading the others
                pass

    def unload(self, name: str) -> None:
        entry = self.entry(name)
        with entry.lock:
            self._release(entry)
            entry.state, entry.reason = ModelState.UNLOADED, ""

    @staticmethod
    def _release(entry: ModelEntry) -> None:
        if entry.backend is not None:
            try:
                entry.backend.unload()
            finally:
                entry.backend = None
