"""tensorfleet client SDK. Its runtime needs are grpcio, protobuf and numpy: no torch, no TF."""

from __future__ import annotations

from importlib import metadata as _metadata

from .async_inference_client import AsyncInferenceClient
from .channel import ConnectionOptions
from .coordinator_client import AsyncCoordinatorClient, CoordinatorClient
from .errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TensorfleetError,
    Unauthenticated,
    Unavailable,
)
from .inference_client import InferenceClient

try:
    __version__ = _metadata.version("tensorfleet")
except _metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = [
    "AsyncCoordinatorClient",
    "AsyncInferenceClient",
    "Cancelled",
    "ConnectionOptions",
    "CoordinatorClient",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InferenceClient",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "TensorfleetError",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]
