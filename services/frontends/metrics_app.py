"""`--metrics-port`: Prometheus metrics over HTTP with the server's token and TLS (issue 28.12).

prometheus_client's own `start_http_server` answered anyone in plaintext, beside a gRPC port
that asked for a token. This plain ASGI app (GET /metrics, and / for scrapers pointed at the
root) runs on core/http_server.py like REST: the same token (`Authorization: Bearer`, as
Prometheus' `authorization` / `bearer_token_file` sends it), the same TLS, no-delay, timeouts,
connection cap, and the browser guard when there is no token. The same text is also on the
REST port's /metrics.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tensorfleet.core.auth import SUBMIT, TokenAuth, check_request

PATHS = frozenset({"/metrics", "/"})


def build_metrics_app(registry: CollectorRegistry, auth: TokenAuth | None = None) -> Any:
    """An ASGI app serving `registry` as Prometheus text to callers with the token."""

    async def reply(send: Any, status: int, body: bytes, content_type: bytes, extra: list | None = None) -> None:
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def error(send: Any, status: int, message: str, extra: list | None = None) -> None:
        await reply(send, status, json.dumps({"error": message}).encode(), b"application/json", extra)

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] not in PATHS:
            await error(send, 404, f"not found: {scope['path']} (metrics are at /metrics)")
            return
        if scope["method"] not in ("GET", "HEAD"):
            await error(send, 405, "metrics take GET only", [(b"allow", b"GET, HEAD")])
            return
        headers = {name.decode("latin-1"): value for name, value in scope["headers"]}  # ASGI: lower-case names
        if not check_request(auth, headers, SUBMIT):
            await error(send, 401, "missing or wrong bearer token (header 'Authorization: Bearer <token>')",
                        [(b"www-authenticate", b"Bearer")])
            return
        await reply(send, 200, generate_latest(registry), CONTENT_TYPE_LATEST.encode())

    return app


class MetricsFrontEnd:
    """The metrics app served in the running event loop (core/http_server.py)."""

    def __init__(self, app: Any, host: str, port: int, **options: Any) -> None:
        from tensorfleet.core.http_server import EmbeddedHttpServer

        self._server = EmbeddedHttpServer(app, host, port, what="metrics", **options)

    async def start(self) -> int:
        """Bind (0 picks a free port) and serve; a port it cannot bind: ListenError, an Unavailable."""
        return await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()
