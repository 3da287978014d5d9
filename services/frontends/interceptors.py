"""The server interceptor that maps our error types to gRPC status codes (auth: tensorfleet.core.auth).

`_wrap` knows the four rpc shapes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from tensorfleet.core.errors import TensorfleetError

log = logging.getLogger("tensorfleet.rpc")

Guard = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


async def _fail(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    if isinstance(error, TensorfleetError):
        await context.abort(error.code, error.message)
    log.exception("unexpected error in rpc", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")


def _wrap(handler: grpc.RpcMethodHandler, around: Callable[[Callable], Callable]) -> grpc.RpcMethodHandler:
    """The same handler and (de)serializers, its behaviour passed through `around`."""
    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    for kind, factory in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ):
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return factory(
                around(behaviour), request_deserializer=deserializer, response_serializer=serializer
            )
    return handler


def _guarded(behaviour: Callable, guard: Guard | None) -> Callable:
    """Run `guard` first, then the behaviour; any domain error becomes a status code."""
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request_or_iterator, context):
            try:
                if guard:
                    await guard(request_or_iterator, context)
                async for item in behaviour(request_or_iterator, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _fail(context, error)

        return stream

    async def unary(request_or_iterator, context):
        try:
            if guard:
                await guard(request_or_iterator, context)
            return await behaviour(request_or_iterator, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _fail(context, error)

    return unary


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """TensorfleetError -> its status code and message; anything else -> INTERNAL, logged."""

    def __init__(self) -> None:
        #: method -> (the handler, its wrapped form): wrapped once, not on every call
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        cached = self._wrapped.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(handler, lambda behaviour: _guarded(behaviour, None))
        self._wrapped[handler_call_details.method] = (handler, wrapped)  # only methods a service has
        return wrapped
