"""The one interface every backend implements.

A backend loads once, warms up, then runs batches of numpy arrays. Adding one is a new
file with a Backend subclass and one line in the table in backends/__init__.py.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..model_config import ModelConfig


class OutOfMemory(Exception):
    """A batch did not fit on the device. The batcher halves the batch and retries.

    Backends raise it (or let torch.cuda.OutOfMemoryError through); Python models may too.
    """


def is_out_of_memory(error: BaseException) -> bool:
    """True for our OutOfMemory and for the frameworks' own out-of-memory errors."""
    if isinstance(error, (OutOfMemory, MemoryError)):
        return True
    name = type(error).__name__
    if name in ("OutOfMemoryError", "ResourceExhaustedError"):  # torch.cuda, TensorFlow
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


#: What the frameworks say when the device itself failed, not the batch: the CUDA context is
#: then unusable for every later batch (an illegal address, a device-side assert, an ECC error,
#: a GPU fallen off the bus). Out-of-memory errors are not among them: they are the batch's.
DEVICE_FAILURES = (
    "cuda error", "cuda_error_", "cublas_status_execution_failed", "cudnn_status_execution_failed",
    "cudnn_status_internal_error", "device-side assert", "illegal memory access", "unspecified launch failure",
    "fallen off the bus", "uncorrectable ecc error",
)


def is_device_lost(error: BaseException) -> bool:
    """True when the error says the device failed: the server should stop and be started afresh."""
    if is_out_of_memory(error):
        return False
    text = str(error).lower()
    return any(marker in text for marker in DEVICE_FAILURES)


@dataclass
class ModelContext:
    """What a model sees when it loads."""

    model_dir: Path
    config: ModelConfig
    device: str = "cpu"
    precision: str = "fp32"
    parameters: dict[str, Any] = field(default_factory=dict)

    def artifact(self, name: str) -> Path:
        return self.model_dir / name


class Backend(abc.ABC):
    """Runs one loaded model. Calls come from one worker thread, one batch at a time."""

    def __init__(self, context: ModelContext) -> None:
        self.context = context

    @abc.abstractmethod
    def load(self) -> None:
        """Read artifacts and place the model on its device."""

    def warmup(self) -> None:
        """Run example shapes so the first real request pays no compile or allocation cost."""

    @abc.abstractmethod
    def predict(
        self, inputs: dict[str, np.ndarray], outputs: frozenset[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """One batch in (first axis = rows), one batch out with the same row count.

        `outputs`: the only outputs this batch's requests want (None: all); the others may be
        left out of the result. `parameters`: the requests' own Open Inference Protocol
        parameters (every request of a batch has the same ones); backends that have no use for
        them ignore them."""

    def can_stage(self) -> bool:
        """True when `stage` can copy a batch's inputs to the device ahead of `predict_staged`,
        so the batcher copies the next batch while the current one computes."""
        return False

    def stage(self, inputs: dict[str, np.ndarray]) -> Any:
        """Start copying one batch's inputs to the device (another thread than predict's)."""
        raise NotImplementedError

    def predict_staged(self, staged: Any, outputs: frozenset[str] | None = None) -> dict[str, np.ndarray]:
        """`predict` on inputs `stage` has copied."""
        raise NotImplementedError

    def last_stages(self) -> dict[str, int]:
        """The last predict's own split, in ns: {"h2d", "compute", "d2h"}; {} when this backend
        cannot tell its copies from its compute (the batcher then counts all of it as compute).
        Read on the model thread right after predict returns."""
        return {}

    def fingerprint(self) -> str:
        """A digest of what the model loaded from outside its model folder (a Hugging Face
        checkpoint's config and weights); '' when everything is among the declared artifacts."""
        return ""

    def unload(self) -> None:
        """Release device memory."""

    def device_memory(self) -> tuple[int, int]:
        """(used, total) bytes on this backend's device; (0, 0) when unknown."""
        return 0, 0
