"""Requests whose bytes do not parse get INVALID_ARGUMENT naming the message type, on every server.

grpc's aio server parses a request with the method's deserializer before any handler or
interceptor sees it, and answers a parse failure with UNKNOWN "Unexpected DecodeError" (issue
28's probe: 24 such answers on ModelMetadata, RepositoryModelLoad, SubmitJob...). This
interceptor takes the parse over for methods with one request message: the handler gets the
raw bytes, parses them itself, and a malformed message is the caller's error, said as such.
Streaming requests keep grpc's own parse (their first message is read inside the handler).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc


async def _parse(parse: Callable[[bytes], Any], data: bytes, context: grpc.aio.ServicerContext, method: str) -> Any:
    try:
        return parse(data)
    except Exception as error:  # noqa: BLE001 - DecodeError, or whatever a parser raises on bad bytes
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"malformed request to {method}: {type(error).__name__}: {error}"[:500])


def _unary_unary(behaviour: Callable, parse: Callable, method: str) -> Callable:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        result = behaviour(await _parse(parse, data, context, method), context)
        return await result if inspect.isawaitable(result) else result

    return handle


def _unary_stream(behaviour: Callable, parse: Callable, method: str) -> Callable:
    if not inspect.isasyncgenfunction(behaviour):  # a coroutine that writes with context.write

        async def write(data: bytes, context: grpc.aio.ServicerContext) -> None:
            await behaviour(await _parse(parse, data, context, method), context)

        return write

    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        async for item in behaviour(await _parse(parse, data, context, method), context):
            yield item

    return handle


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """INVALID_ARGUMENT, not UNKNOWN, for a request message that does not parse (unary requests)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method, parse = handler_call_details.method, handler.request_deserializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_unary_unary(handler.unary_unary, parse, method),
                                                       response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_unary_stream(handler.unary_stream, parse, method),
                                                        response_serializer=handler.response_serializer)
        return handler
