"""Bearer-token auth and TLS for the coordinator service, with the model servers' rules.

Health stays open (probes carry no token); every other rpc needs `authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
_DENIED = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"


async def _deny_unary(request, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)


async def _deny_stream(request, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
    yield  # pragma: no cover - makes this an async generator


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(given).encode(), self._expected):
            return handler
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _deny_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _deny_unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # Streaming requests (reflection): refuse them the same way.
        factory = grpc.stream_stream_rpc_method_handler if handler.stream_stream else grpc.stream_unary_rpc_method_handler
        return factory(
            _deny_stream if handler.stream_stream else _deny_unary,
            request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer,
        )


def server_credentials(cert: Path | None, key: Path | None, ca: Path | None) -> grpc.ServerCredentials | None:
    """TLS with --tls-cert/--tls-key; mutual TLS when --tls-ca is given too."""
    if not cert:
        return None
    if not key:
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca.read_bytes() if ca else None, require_client_auth=ca is not None,
    )
