"""tensorfleet client SDK. Its runtime needs are grpcio, protobuf and numpy: no torch, no TF."""

from __future__ import annotations

from tensorfleet.core.errors import (
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
from tensorfleet.core.version import __version__

from .async_inference_client import AsyncInferenceClient
from .channel import ConnectionOptions
from .coordinator_client import AsyncCoordinatorClient, CoordinatorClient
from .inference_client import InferenceClient

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
