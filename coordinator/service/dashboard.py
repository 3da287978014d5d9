"""A read-only web dashboard for the coordinator service (`coordinator serve --http-port P`).

One page (static/dashboard.html with plain JavaScript and CSS, nothing fetched from the
internet) over JSON endpoints built from what the service already has:

- GET /api/jobs            every job as `tensorfleet top` shows it (top.job_row of job_message);
- GET /api/jobs/{id}       one job, with rows done and rows/s over time (from the chunks'
                           commit times in its manifest), its first failed rows and its events;
- GET /api/servers         the servers ListServers probes (top.server_row), with this host's
                           GPUs where NVML answers.

Imported only with --http-port (FastAPI). Served by uvicorn as a task in the service's own event loop. With tokens, /api/* needs
`Authorization: Bearer <token>` with the read or the submit token (tensorfleet.core.auth); the page itself holds no data and stays open, and its script
takes the token from the address's #token=... fragment (never sent to the server or logged).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException

from tensorfleet.core.auth import READ, TokenAuth, check_request

from ..engine.manifest import Manifest
from ..engine.run_progress import run_dirs
from .gpus import Nvml, gpu_of
from .job_manager import JobManager, JobRequestError
from .top import job_row, server_row


class ServiceView(Protocol):
    """What the dashboard reads of the service (grpc_service.CoordinatorServicer has both): the job
    manager, and the fleet as ListServers probes it (tensorfleet.v1.ServerEntry messages)."""

    manager: JobManager

    async def server_entries(self) -> Sequence[Any]: ...

log = logging.getLogger("tensorfleet.coordinator.service.dashboard")

STATIC = Path(__file__).with_name("static")
HISTORY_POINTS = 60
ERRORS_SHOWN = 100
EVENTS_SHOWN = 50


def history(commits: list[tuple[float, int, int]], since: float | None = None) -> list[dict[str, float]]:
    """Rows done and rows/s over time from (committed_at, rows, failed) of each done chunk.

    The span from `since` (the job's start) to the last commit is cut into at most
    HISTORY_POINTS equal steps; each point has the time, the rows done by then, and the rate
    over its step."""
    if not commits:
        return []
    start = min(commits[0][0] if since is None else since, commits[0][0])
    end = commits[-1][0]
    steps = max(1, min(HISTORY_POINTS, len(commits)))
    width = max((end - start) / steps, 1e-6)
    points, done, index = [{"time": start, "rows_done": 0, "rows_per_second": 0.0}], 0, 0
    for step in range(1, steps + 1):
        edge = start + step * width if step < steps else end
        before = done
        while index < len(commits) and commits[index][0] <= edge:
            done += commits[index][1]
            index += 1
        points.append({"time": edge, "rows_done": done, "rows_per_second": (done - before) / width})
    return points


class DashboardData:
    """The JSON behind the page, from the service's job manager and its server probes."""

    def __init__(self, servicer: ServiceView) -> None:
        self.servicer = servicer
        self.manager = servicer.manager
        self._nvml: Nvml | None = None

    def _row(self, record) -> dict[str, Any]:
        from .job_message import job_message

        row = job_row(job_message(record, self.manager.progress(record)))
        row.update(submitted_at=record.submitted_at, started_at=record.started_at,
                   finished_at=record.finished_at, exit_code=record.exit_code, output=record.output)
        return row

    def jobs(self) -> list[dict[str, Any]]:
        return [self._row(record) for record in self.manager.store.list()]

    def job(self, job_id: str) -> dict[str, Any]:
        record = self.manager.get(job_id)
        row = self._row(record)
        commits, errors = [], []
        for run_dir in run_dirs(Path(record.job_dir)) if record.attempts else []:  # a workflow: every part's
            manifest = Manifest.open_existing(run_dir)
            if manifest is None:
                continue
            try:
                commits += manifest.commits()
                errors += [vars(e) for e in manifest.first_errors(ERRORS_SHOWN - len(errors))] if len(errors) < ERRORS_SHOWN else []
            finally:
                manifest.close()
        commits.sort()
        events = self.manager.store.events(job_id)[-EVENTS_SHOWN:]
        row.update(
            history=history(commits, record.started_at),
            errors=errors,
            events=[{"time": e.time, "kind": e.kind, "state": e.state, "message": e.message} for e in events],
        )
        return row

    async def servers(self) -> dict[str, Any]:
        entries = await self.servicer.server_entries()
        if self._nvml is None:
            self._nvml = Nvml()
        gpus = self._nvml.gpus()
        rows = []
        for entry in entries:
            row = server_row(entry.address, entry.info if entry.reachable else None, entry.error, list(entry.sources))
            row["job_rows"] = entry.job_rows
            row["gpu"] = gpu_of(row, gpus)
            rows.append(row)
        return {"servers": rows, "gpus": gpus}

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()


class Refused(Exception):
    """An HTTP error with a JSON body: {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def build_app(data: DashboardData, auth: TokenAuth | None = None) -> FastAPI:
    """The FastAPI app: the page, its script and style, and the JSON endpoints."""
    async def authorized(request: Request) -> None:
        if not check_request(auth, request.headers, READ):  # the read or the submit token
            raise Refused(401, "missing or wrong bearer token (header 'Authorization: Bearer <token>')")

    async def refused(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, Refused)
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    app = FastAPI(title="tensorfleet coordinator", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(Refused, refused)
    app.add_exception_handler(HTTPException, http_error)
    api = APIRouter(prefix="/api", dependencies=[Depends(authorized)])
    files = {"/": "dashboard.html", "/dashboard.js": "dashboard.js", "/dashboard.css": "dashboard.css"}
    for route, name in files.items():
        app.add_api_route(route, _static(STATIC / name), methods=["GET"])

    @app.get("/api/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @api.get("/jobs")
    async def jobs() -> JSONResponse:
        return JSONResponse({"jobs": data.jobs()})

    @api.get("/jobs/{job_id}")
    async def job(job_id: str) -> JSONResponse:
        try:
            return JSONResponse(data.job(job_id))
        except JobRequestError as error:
            raise Refused(404 if error.kind == "not_found" else 400, str(error)) from None

    @api.get("/servers")
    async def servers() -> JSONResponse:
        return JSONResponse(await data.servers())

    app.include_router(api)
    return app


def _static(path: Path) -> Any:
    async def serve() -> FileResponse:
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    return serve


class DashboardServer:
    """The dashboard served in the service's event loop (core/http_server.py)."""

    def __init__(self, app: Any, host: str, port: int, **options: Any) -> None:
        from tensorfleet.core.http_server import EmbeddedHttpServer

        self._server = EmbeddedHttpServer(app, host, port, what="the dashboard", **options)

    async def start(self) -> int:
        return await self._server.start()  # a port it cannot bind: ListenError, an Unavailable

    async def stop(self) -> None:
        await self._server.stop()
