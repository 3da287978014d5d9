"""Clients of the coordinator service (tensorfleet.v1.Coordinator), sync and async.

Submit a job file (path, YAML/JSON text or a dict), follow its events, cancel, resume or retry it,
and see the fleet. Replies are the protobuf messages (`Job`, `JobEvent`, `ServerEntry`);
`job_state(job)` gives a state's name. Errors are the typed errors of tensorfleet.client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc

from tensorfleet.core.errors import from_rpc_error
from tensorfleet.protos import tensorfleet_pb2 as tf
from tensorfleet.protos import tensorfleet_pb2_grpc as tf_grpc

from .channel import ConnectionOptions, aio_channel, sync_channel

FINAL_STATES = frozenset({tf.SUCCEEDED, tf.FAILED, tf.CANCELLED})
JobSpecSource = str | Path | dict[str, Any]


def job_state(job: tf.Job) -> str:
    return tf.JobState.Name(job.state)


def _names_a_file(text: str) -> bool:
    """Whether one line of text is a job file's path (a long JSON spec is not: no OSError for it)."""
    try:
        return len(text) < 4096 and Path(text).is_file()
    except (OSError, ValueError):
        return False


def _submit_request(spec: JobSpecSource, base_dir: str | Path | None, timeout_s: float, limit: int | None) -> tf.SubmitJobRequest:
    """A path sends the file's text with its folder as base_dir (relative paths stay relative to it)."""
    if isinstance(spec, dict):
        text = json.dumps(spec)
    elif isinstance(spec, Path) or (isinstance(spec, str) and "\n" not in spec and _names_a_file(spec)):
        path = Path(spec).resolve()
        text = path.read_text()
        base_dir = base_dir or path.parent
    else:
        text = spec
    return tf.SubmitJobRequest(
        spec=text, base_dir=str(Path(base_dir).resolve()) if base_dir else "", timeout_s=timeout_s, limit=limit or 0
    )


class CoordinatorClient:
    """Blocking client. `with CoordinatorClient("host:50051") as c: c.submit("job.yaml")`."""

    def __init__(self, address: str, *, options: ConnectionOptions | None = None, timeout: float = 30.0) -> None:
        self.address = address
        self.options = options or ConnectionOptions()
        self.timeout = timeout
        self._channel = sync_channel(address, self.options)
        self._stub = tf_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self.options.metadata())
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def submit(
        self, spec: JobSpecSource, *, base_dir: str | Path | None = None, timeout_s: float = 0.0, limit: int | None = None
    ) -> tf.Job:
        return self._call(self._stub.SubmitJob, _submit_request(spec, base_dir, timeout_s, limit))

    def get(self, job_id: str) -> tf.Job:
        return self._call(self._stub.GetJob, tf.GetJobRequest(job_id=job_id))

    def jobs(self, states: list[str] | None = None) -> list[tf.Job]:
        request = tf.ListJobsRequest(states=[tf.JobState.Value(s) for s in states or []])
        return list(self._call(self._stub.ListJobs, request).jobs)

    def cancel(self, job_id: str) -> tf.Job:
        return self._call(self._stub.CancelJob, tf.CancelJobRequest(job_id=job_id))

    def resume(self, job_id: str) -> tf.Job:
        return self._call(self._stub.ResumeJob, tf.ResumeJobRequest(job_id=job_id))

    def retry(self, job_id: str) -> tf.Job:
        """Queue a finished job again with its failed rows computed again (`run --retry-failed`)."""
        return self._call(self._stub.RetryJob, tf.RetryJobRequest(job_id=job_id))

    def servers(self) -> list[tf.ServerEntry]:
        return list(self._call(self._stub.ListServers, tf.ListServersRequest()).servers)

    def watch(self, job_id: str, after_seq: int = 0) -> Iterator[tf.JobEvent]:
        """Every event of the job after `after_seq`, live, until it reaches a final state."""
        call = self._stub.WatchJob(tf.WatchJobRequest(job_id=job_id, after_seq=after_seq), metadata=self.options.metadata())
        try:
            yield from call
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    def wait(self, job_id: str) -> tf.Job:
        """Follow the job until it is SUCCEEDED, FAILED or CANCELLED; return it then."""
        seq = 0
        while True:
            for event in self.watch(job_id, seq):
                seq = event.seq
            job = self.get(job_id)
            if job.state in FINAL_STATES:
                return job


class AsyncCoordinatorClient:
    """The same methods, awaitable; `watch` is an async iterator."""

    def __init__(self, address: str, *, options: ConnectionOptions | None = None, timeout: float = 30.0) -> None:
        self.address = address
        self.options = options or ConnectionOptions()
        self.timeout = timeout
        self._channel = aio_channel(address, self.options)
        self._stub = tf_grpc.CoordinatorStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncCoordinatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout, metadata=self.options.metadata())
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def submit(
        self, spec: JobSpecSource, *, base_dir: str | Path | None = None, timeout_s: float = 0.0, limit: int | None = None
    ) -> tf.Job:
        return await self._call(self._stub.SubmitJob, _submit_request(spec, base_dir, timeout_s, limit))

    async def get(self, job_id: str) -> tf.Job:
        return await self._call(self._stub.GetJob, tf.GetJobRequest(job_id=job_id))

    async def jobs(self, states: list[str] | None = None) -> list[tf.Job]:
        request = tf.ListJobsRequest(states=[tf.JobState.Value(s) for s in states or []])
        return list((await self._call(self._stub.ListJobs, request)).jobs)

    async def cancel(self, job_id: str) -> tf.Job:
        return await self._call(self._stub.CancelJob, tf.CancelJobRequest(job_id=job_id))

    async def resume(self, job_id: str) -> tf.Job:
        return await self._call(self._stub.ResumeJob, tf.ResumeJobRequest(job_id=job_id))

    async def retry(self, job_id: str) -> tf.Job:
        return await self._call(self._stub.RetryJob, tf.RetryJobRequest(job_id=job_id))

    async def servers(self) -> list[tf.ServerEntry]:
        return list((await self._call(self._stub.ListServers, tf.ListServersRequest())).servers)

    async def watch(self, job_id: str, after_seq: int = 0) -> AsyncIterator[tf.JobEvent]:
        call = self._stub.WatchJob(tf.WatchJobRequest(job_id=job_id, after_seq=after_seq), metadata=self.options.metadata())
        try:
            async for event in call:
                yield event
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def wait(self, job_id: str) -> tf.Job:
        seq = 0
        while True:
            async for event in self.watch(job_id, seq):
                seq = event.seq
            job = await self.get(job_id)
            if job.state in FINAL_STATES:
                return job
