"""The error types, re-exported from tensorfleet.core.errors (one family shared by client and server).

Kept so that `tensorfleet.client.errors` imports keep working for users."""

from tensorfleet.core.errors import (
    DEVICE_FAILED,
    AlreadyExists,
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
    Unimplemented,
    error_for_code,
    from_rpc_error,
)

__all__ = [
    "DEVICE_FAILED",
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "error_for_code",
    "FailedPrecondition",
    "from_rpc_error",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "TensorfleetError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
