"""`tensorfleet coordinator serve`: the coordinator as a long-lived gRPC service.

tensorfleet.v1.Coordinator (jobs) with health and reflection, so grpcurl lists it and submits
JSON; bearer-token auth (a read and a submit role) and TLS from tensorfleet.core, as on the
model servers; what a job may touch is the JobPolicy's (job_policy.py). Jobs persist in SQLite under the
state folder, and each runs the engine (`tensorfleet run ... --resume`), see job_manager.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection

from tensorfleet.client import ConnectionOptions
from tensorfleet.client.channel import aio_channel
from tensorfleet.core.auth import READ, SUBMIT, TokenAuth, TokenAuthInterceptor
from tensorfleet.core.exposure import DEFAULT_HOST
from tensorfleet.core.grpc_server import GrpcServer, stop_on_signals
from tensorfleet.core.malformed import MalformedRequestInterceptor
from tensorfleet.core.settings import MAX_MESSAGE_BYTES, server_options
from tensorfleet.protos import tensorfleet_pb2 as tf
from tensorfleet.protos import tensorfleet_pb2_grpc as tf_grpc

from ..fleet.discovery import DiscoveryError, expand
from .job_manager import JobManager, JobRequestError
from .job_message import job_message
from .job_policy import JobPolicy
from .jobstore import RUNNING, JobRecord, JobStore

log = logging.getLogger("tensorfleet.coordinator.service")

COORDINATOR_SERVICE = tf.DESCRIPTOR.services_by_name["Coordinator"].full_name
STORE_NAME = "coordinator.sqlite"
_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "denied": grpc.StatusCode.PERMISSION_DENIED,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
}
#: The role each Coordinator rpc needs; reflection only reads. Anything else needs SUBMIT.
METHOD_ROLES = {
    f"/{COORDINATOR_SERVICE}/GetJob": READ, f"/{COORDINATOR_SERVICE}/ListJobs": READ,
    f"/{COORDINATOR_SERVICE}/WatchJob": READ, f"/{COORDINATOR_SERVICE}/ListServers": READ,
    f"/{reflection.SERVICE_NAME}/": READ, "/grpc.reflection.v1.ServerReflection/": READ,
}
MAX_JOB_ID = 200


@dataclass
class ServiceOptions:
    state_dir: Path
    host: str = DEFAULT_HOST
    port: int = 50051
    port_file: Path | None = None
    #: The submit token (submit, cancel, resume, and everything the read token may do).
    token: str | None = None
    #: The read token: status, watch, jobs, servers.
    read_token: str | None = None
    insecure: bool = False
    policy: JobPolicy = field(default_factory=JobPolicy)
    max_queued_jobs: int = 100
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_concurrent_rpcs: int = 256
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    max_jobs: int = 1
    keep_finished: int = 1000
    #: The coordinator's own fleet for ListServers (host:port, dns:NAME:PORT, hostfile:PATH).
    servers: list[str] = field(default_factory=list)
    server_token: str | None = None
    #: The read-only web dashboard (dashboard.py) on this port, same host, token and TLS.
    http_port: int | None = None
    http_port_file: Path | None = None
    #: Host names the dashboard accepts besides loopback, IPs and --host (only checked with no token).
    http_allow_hosts: list[str] = field(default_factory=list)
    #: A header that may carry a token as it is, besides `authorization: Bearer` (e.g. x-api-key).
    api_key_header: str | None = None


class CoordinatorServicer(tf_grpc.CoordinatorServicer):
    def __init__(self, manager: JobManager, options: ServiceOptions) -> None:
        self.manager = manager
        self.options = options
        #: address -> (monotonic time, rows_done) at the last probe, for rows/s between probes.
        self._server_rows: dict[str, tuple[float, int]] = {}

    def _job(self, record: JobRecord) -> tf.Job:
        return job_message(record, self.manager.progress(record))

    async def _call(self, context: grpc.aio.ServicerContext, action, *args):
        if action != self.manager.submit and len(str(args[0])) > MAX_JOB_ID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"job_id longer than {MAX_JOB_ID} characters")
        try:
            return action(*args)
        except JobRequestError as error:
            await context.abort(_CODES[error.kind], str(error))

    async def SubmitJob(self, request, context):
        try:  # off the event loop: health and other rpcs go on while a large spec is parsed and checked
            prepared = await asyncio.to_thread(self.manager.prepare, request.spec, request.base_dir,
                                               request.timeout_s, request.limit or None)
        except JobRequestError as error:
            await context.abort(_CODES[error.kind], str(error))
        record = await self._call(
            context, self.manager.submit, request.spec, request.base_dir, request.timeout_s, request.limit or None,
            prepared,
        )
        return self._job(record)

    async def GetJob(self, request, context):
        return self._job(await self._call(context, self.manager.get, request.job_id))

    async def ListJobs(self, request, context):
        states = {tf.JobState.Name(state) for state in request.states}
        return tf.ListJobsResponse(jobs=[self._job(r) for r in self.manager.store.list(states or None)])

    async def CancelJob(self, request, context):
        return self._job(await self._call(context, self.manager.cancel, request.job_id))

    async def ResumeJob(self, request, context):
        return self._job(await self._call(context, self.manager.resume, request.job_id))

    async def RetryJob(self, request, context):
        return self._job(await self._call(context, self.manager.retry, request.job_id))

    async def WatchJob(self, request, context):
        await self._call(context, self.manager.get, request.job_id)
        seq = request.after_seq
        while True:
            events = self.manager.store.events(request.job_id, seq)
            if events:
                job = self._job(self.manager.get(request.job_id))
                for event in events:
                    seq = event.seq
                    yield tf.JobEvent(
                        seq=event.seq, job_id=event.job_id, time=event.time, kind=event.kind,
                        state=tf.JobState.Value(event.state), message=event.message, job=job,
                    )
                continue
            if self.manager.is_final(request.job_id):
                return
            async with self.manager.changed:
                try:
                    await asyncio.wait_for(self.manager.changed.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass

    async def ListServers(self, request, context):
        return tf.ListServersResponse(servers=await self.server_entries())

    async def server_entries(self) -> list[tf.ServerEntry]:
        """The coordinator's fleet and every running job's servers, each probed now."""
        sources: dict[str, list[str]] = {}
        tokens: dict[str, str | None] = {}
        job_rows: dict[str, int] = {}
        try:
            for address in expand(self.options.servers):
                sources.setdefault(address, []).append("coordinator")
                tokens[address] = self.options.server_token
        except DiscoveryError as error:
            log.warning("coordinator fleet: %s", error)
        for record in self.manager.store.list({RUNNING}):
            for server in self.manager.progress(record).get("servers") or []:
                address = server["address"]
                sources.setdefault(address, []).append(record.id)
                # an address only a job named gets no token: the job's submitter may own it (issue 28 #1)
                tokens.setdefault(address, None)
                job_rows[address] = job_rows.get(address, 0) + int(server.get("rows") or 0)
        entries = await asyncio.gather(*(self._probe(address, tokens[address]) for address in sources))
        for entry in entries:
            entry.sources.extend(sources[entry.address])
            entry.job_rows = job_rows.get(entry.address, 0)
        return list(entries)

    async def _probe(self, address: str, token: str | None) -> tf.ServerEntry:
        entry = tf.ServerEntry(address=address)
        channel = aio_channel(address, ConnectionOptions(token=token))
        try:
            stub = tf_grpc.ServerControlStub(channel)
            options = ConnectionOptions(token=token)
            info = await stub.GetServerInfo(tf.GetServerInfoRequest(), timeout=3.0, metadata=options.metadata())
        except grpc.RpcError as error:
            entry.reachable = False
            entry.error = f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
            return entry
        finally:
            await channel.close()
        now = time.monotonic()
        total = sum(model.rows_done for model in info.models)
        previous = self._server_rows.get(address)
        self._server_rows[address] = (now, total)
        if previous is not None and now > previous[0]:
            rate = max(total - previous[1], 0) / (now - previous[0])
            for model in info.models:
                if not model.rows_per_second and len(info.models) == 1:
                    model.rows_per_second = rate
        entry.reachable = True
        entry.info.CopyFrom(info)
        return entry


class CoordinatorService:
    """The gRPC server, the job manager's loop, health, and orderly shutdown on SIGTERM."""

    def __init__(self, options: ServiceOptions) -> None:
        self.options = options
        #: Who may do what (None: no token); the dashboard asks it too.
        self.auth = None
        interceptors = []
        if options.token or options.read_token:
            self.auth = TokenAuth({SUBMIT: options.token or "", READ: options.read_token or ""}, options.api_key_header)
            interceptors.append(TokenAuthInterceptor(self.auth, METHOD_ROLES, default_role=SUBMIT))
        interceptors.append(MalformedRequestInterceptor())  # bad bytes: INVALID_ARGUMENT (core/malformed.py)
        self.listener = GrpcServer(
            what="coordinator", host=options.host, port=options.port, services=[COORDINATOR_SERVICE],
            authenticated=bool(options.token or options.read_token), insecure=options.insecure,
            tls_cert=options.tls_cert, tls_key=options.tls_key, tls_ca=options.tls_ca,
            interceptors=interceptors, max_concurrent_rpcs=options.max_concurrent_rpcs,
            options=server_options(options.max_message_bytes),
        )
        self.credentials = self.listener.credentials
        self.health = self.listener.health
        self.grpc = self.listener.server
        options.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(options.state_dir / STORE_NAME)
        policy = options.policy
        policy.output_roots.append(options.state_dir.resolve())  # job folders of object-store jobs
        self.manager = JobManager(self.store, options.state_dir.resolve(), max_jobs=options.max_jobs,
                                  policy=policy, max_queued=options.max_queued_jobs, keep_finished=options.keep_finished)
        self.servicer = CoordinatorServicer(self.manager, options)
        tf_grpc.add_CoordinatorServicer_to_server(self.servicer, self.grpc)
        self.listener.add_health_and_reflection()
        self._stopping = asyncio.Event()
        self.port = 0
        self.dashboard = None

    async def start(self) -> int:
        credentials = self.credentials
        self.port = self.listener.bind()
        self.manager.recover()
        await self.grpc.start()
        await self.listener.set_health(("", COORDINATOR_SERVICE), True)
        if self.options.http_port is not None:
            port = await self.listener.start_side_server(self._start_dashboard, self.options.http_port_file)
            log.info("dashboard on http%s://%s:%d/", "s" if self.options.tls_cert else "", self.options.host, port)
        self.listener.write_port_file(self.options.port_file)
        log.info("coordinator on %s:%d (%s), state in %s, up to %d job(s) at once", self.options.host, self.port,
                 "TLS" if credentials else "plaintext", self.options.state_dir, self.options.max_jobs)
        return self.port

    async def _start_dashboard(self) -> int:
        from .dashboard import (  # FastAPI only when asked for
            DashboardData,
            DashboardServer,
            build_app,
        )

        options = self.options
        self.dashboard_data = DashboardData(self.servicer)
        self.dashboard = DashboardServer(
            build_app(self.dashboard_data, self.auth), options.host, options.http_port or 0,
            tls_cert=options.tls_cert, tls_key=options.tls_key, tls_ca=options.tls_ca,
            browser_guard=not (options.token or options.read_token), allow_hosts=options.http_allow_hosts,
        )
        return await self.dashboard.start()

    async def run_until_stopped(self) -> None:
        stop_on_signals(self._stopping.set)
        scheduler = asyncio.create_task(self.manager.run())
        await self._stopping.wait()
        await self.listener.set_health(("", COORDINATOR_SERVICE), False)
        await self.manager.shutdown()
        scheduler.cancel()
        await asyncio.gather(scheduler, return_exceptions=True)
        await self.grpc.stop(grace=5)
        if self.dashboard is not None:
            await self.dashboard.stop()
            self.dashboard_data.close()
        self.store.close()
        log.info("coordinator stopped")


async def serve(options: ServiceOptions) -> None:
    service = CoordinatorService(options)
    await service.start()
    await service.run_until_stopped()
