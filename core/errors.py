"""One error family shared by client and server: each type carries its gRPC status code.

The server raises these; one interceptor turns them into status codes. The client turns
status codes back into the same types, so callers catch `InvalidArgument`, not RpcError.
"""

from __future__ import annotations

import grpc


class TensorfleetError(Exception):
    """Base of every error tensorfleet raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(TensorfleetError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TensorfleetError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TensorfleetError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(TensorfleetError):
    """The target exists but is not in a state to serve (model not loaded, server draining)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(TensorfleetError):
    """A bounded queue is full or a message is too large; retry later or send less."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(TensorfleetError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TensorfleetError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(TensorfleetError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TensorfleetError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(TensorfleetError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(TensorfleetError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(TensorfleetError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[TensorfleetError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
        InternalError,
    )
}


def error_for_code(code: grpc.StatusCode, message: str) -> TensorfleetError:
    """The typed error for a status code (InternalError for codes without a type)."""
    return _BY_CODE.get(code, InternalError)(message)


def from_rpc_error(error: grpc.RpcError) -> TensorfleetError:
    """Translate a grpc error (sync or aio) into our typed error, keeping its message."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details and "message larger than max" in details:
        # gRPC's own words; say which setting raises the limit on each side.
        details += (" (the limit is the server's --max-message-mb and the client's max_message_bytes, "
                    "both default $TENSORFLEET_MAX_MESSAGE_MB or 512 MiB)")
    typed = error_for_code(code, details or str(code))
    typed.__cause__ = error
    return typed


#: Said in the UNAVAILABLE message of every request a server answers after its device failed
#: (services' batcher); a coordinator isolating a row reads it (coordinator/engine/dispatcher.py).
DEVICE_FAILED = "the device failed"
