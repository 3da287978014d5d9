"""The Open Inference Protocol's REST half (KServe v2 / Triton HTTP) over the data plane.

A FastAPI app on uvicorn, run as a task in the model server's own event loop beside
grpc.aio: a REST request reaches the same DataPlane, so the same batcher as gRPC, and the
two can share a batch. Routes are thin: convert (rest_converters.py), call, convert back.

Errors are JSON `{"error": "..."}` with the HTTP status of their gRPC code (STATUS below).
With a token (tensorfleet.core.auth, as on gRPC), every route but /v2/health/* needs
`Authorization: Bearer <token>`.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException

from tensorfleet.core.auth import SUBMIT, TokenAuth, check_request
from tensorfleet.core.errors import (
    InvalidArgument,
    TensorfleetError,
    Unauthenticated,
)
from tensorfleet.core.settings import MAX_MESSAGE_BYTES

from ..dataplane import DataPlane
from . import rest_converters as convert
from .grpc_converters import model_config_message

log = logging.getLogger("tensorfleet.http")

#: gRPC status code -> HTTP status, for the errors the data plane raises.
STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _domain_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, TensorfleetError)
    status = STATUS.get(error.code, 500)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return _error(status, error.message, headers)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    return _error(error.status_code, str(error.detail), getattr(error, "headers", None))


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
    return _error(500, f"internal error: {type(error).__name__}: {error}")


def _json_body_flag(body: bytes, key: str) -> bool:
    """A bool in an optional JSON object body (repository index's `ready`)."""
    if not body.strip():
        return False
    doc = convert.split_body(body, None)[0]
    value = doc.get(key, False) if isinstance(doc, dict) else None
    if not isinstance(value, bool):
        raise InvalidArgument(f"request body must be a JSON object with an optional bool '{key}'")
    return value


#: 64-bit fields of ModelConfig, which protobuf's JSON mapping writes as strings; Triton writes numbers.
_INT64_FIELDS = frozenset({"dims", "default_timeout_microseconds", "max_queue_delay_microseconds"})


def _config_json(message: Message) -> dict[str, Any]:
    """Triton's HTTP model config: the JSON mapping of the protobuf message, numbers as numbers."""

    def numbers(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: numbers(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [numbers(v, key) for v in value]
        return int(value) if key in _INT64_FIELDS and isinstance(value, str) else value

    return numbers(json_format.MessageToDict(message, preserving_proto_field_name=True))


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 once it passes `limit` (the gRPC message limit)."""
    declared = request.headers.get("content-length", "")
    too_large = f"request body is over the server's limit of {limit} bytes (--max-message-mb, TENSORFLEET_MAX_MESSAGE_MB)"
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, too_large)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def build_app(
    dataplane: DataPlane,
    auth: TokenAuth | None = None,
    registry: CollectorRegistry | None = None,
    max_body_bytes: int = MAX_MESSAGE_BYTES,
) -> FastAPI:
    """The REST routes over `dataplane`; `auth` guards all but health; `registry` adds GET /metrics.

    `max_body_bytes`: the server's message limit (--max-message-mb), for REST bodies too."""

    async def authorized(request: Request) -> None:
        if not check_request(auth, request.headers, SUBMIT):
            raise Unauthenticated("missing or wrong bearer token (header 'Authorization: Bearer <token>')")

    app = FastAPI(title="tensorfleet", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(TensorfleetError, _domain_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    health = APIRouter()
    guarded = APIRouter(dependencies=[Depends(authorized)])

    @health.get("/v2/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"live": dataplane.live()})

    @health.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ready = dataplane.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @guarded.get("/v2")
    async def server_metadata() -> JSONResponse:
        name, version, extensions = dataplane.server_metadata()
        return JSONResponse({"name": name, "version": version, "extensions": extensions})

    _model_routes(guarded, dataplane, max_body_bytes)
    _repository_routes(guarded, dataplane, registry)

    app.include_router(health)
    app.include_router(guarded)
    return app


def _versioned(path: str) -> list[str]:
    return [f"/v2/models/{{name}}{path}", f"/v2/models/{{name}}/versions/{{version}}{path}"]


def _model_routes(guarded: APIRouter, dataplane: DataPlane, max_body_bytes: int) -> None:
    """Per-model routes: statistics, readiness, metadata, config, infer."""
    # Before /v2/models/{name}, which would take "stats" for a model name.
    for path in ["/v2/models/stats", *_versioned("/stats")]:
        @guarded.get(path)
        async def model_statistics(name: str = "", version: str = "") -> JSONResponse:
            return JSONResponse(convert.statistics_json(dataplane.statistics(name)))

    for path in _versioned("/ready"):
        @guarded.get(path)
        async def model_ready(name: str, version: str = "") -> JSONResponse:
            ready = dataplane.model_ready(name, version)
            return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    for path in _versioned(""):
        @guarded.get(path)
        async def model_metadata(name: str, version: str = "") -> JSONResponse:
            return JSONResponse(convert.model_metadata_json(dataplane.model_metadata(name, version)))

    for path in _versioned("/config"):
        @guarded.get(path)
        async def model_config(name: str, version: str = "") -> JSONResponse:
            message = model_config_message(dataplane.model_details(name, version))
            return JSONResponse(_config_json(message))

    for path in _versioned("/infer"):
        @guarded.post(path)
        async def infer(name: str, request: Request, version: str = "") -> Response:
            body = await _read_body(request, max_body_bytes)
            try:
                wire_request, default_binary, wanted = convert.decode_infer(
                    name, version, body, request.headers.get(convert.HEADER_LENGTH)
                )
            except TensorfleetError as error:
                dataplane.refused(name, error)
                raise
            result = await dataplane.infer(wire_request)
            content, header_length = convert.encode_infer(wire_request.message, result, default_binary, wanted)
            if header_length is None:
                return Response(content, media_type="application/json")
            return Response(
                content,
                media_type="application/octet-stream",
                headers={convert.HEADER_LENGTH: str(header_length)},
            )


def _repository_routes(guarded: APIRouter, dataplane: DataPlane, registry: CollectorRegistry | None) -> None:
    """The repository extension (index, load, unload) and, with a registry, GET /metrics."""
    @guarded.post("/v2/repository/index")
    async def repository_index(request: Request) -> JSONResponse:
        ready_only = _json_body_flag(await _read_body(request, 1 << 20), "ready")
        return JSONResponse(convert.repository_index_json(dataplane.repository_index(ready_only)))

    @guarded.post("/v2/repository/models/{name}/load")
    async def load(name: str, request: Request) -> JSONResponse:
        body = await _read_body(request, 1 << 20)
        doc = convert.split_body(body, None)[0] if body.strip() else {}
        if not isinstance(doc, dict) or doc.get("parameters"):  # Triton's config / file overrides
            raise InvalidArgument(
                "load takes no body parameters: this server loads models only from its own repository, "
                "never configs or files sent in a request"
            )
        await dataplane.load(name)
        return JSONResponse({})

    @guarded.post("/v2/repository/models/{name}/unload")
    async def unload(name: str) -> JSONResponse:
        await dataplane.unload(name)
        return JSONResponse({})

    if registry is not None:
        @guarded.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


#: Request body uvicorn buffers before it stops reading the socket until the app catches up.
BODY_BUFFER_BYTES = 8 << 20


def _buffer_whole_tensors() -> None:
    """Let uvicorn buffer BODY_BUFFER_BYTES of a request body instead of 64 KiB.

    uvicorn pauses reading every 64 KiB of body until the app asks for more: a 1 MB tensor
    then costs 16 pause/resume turns of the event loop and as many extra copies, which made
    REST about 1.2-1.3x gRPC in server CPU (bench/rest.py). uvicorn has no setting for it,
    so its protocol modules' constant is raised; a uvicorn without that constant is left as is.
    Every infer body is read whole anyway (and capped by _read_body)."""
    from uvicorn.protocols.http import h11_impl, httptools_impl

    for module in (h11_impl, httptools_impl):
        if getattr(module, "HIGH_WATER_LIMIT", None) is not None:
            module.HIGH_WATER_LIMIT = max(module.HIGH_WATER_LIMIT, BODY_BUFFER_BYTES)


class HttpFrontEnd:
    """The REST app served in the running event loop (core/http_server.py)."""

    def __init__(self, app: Any, host: str, port: int, **options: Any) -> None:
        from tensorfleet.core.http_server import EmbeddedHttpServer

        _buffer_whole_tensors()
        self._server = EmbeddedHttpServer(app, host, port, what="REST", **options)

    async def start(self) -> int:
        """Bind (a port of 0 picks a free one) and start serving; returns the bound port."""
        return await self._server.start()  # a port it cannot bind: ListenError, an Unavailable

    async def stop(self) -> None:
        await self._server.stop()
