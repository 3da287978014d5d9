"""tensorfleet.v1.ServerControl: device, memory and load for operators; drain."""

from __future__ import annotations

import os

from tensorfleet.core.version import __version__
from tensorfleet.protos import tensorfleet_pb2 as tf
from tensorfleet.protos import tensorfleet_pb2_grpc as tf_grpc

from ..device import describe_device
from ..model_runtime import ModelRuntime


class ControlServicer(tf_grpc.ServerControlServicer):
    def __init__(self, runtime: ModelRuntime, on_drain, insecure: bool = False) -> None:
        self.runtime = runtime
        self.insecure = insecure
        self._on_drain = on_drain

    async def GetServerInfo(self, request, context):
        repository = self.runtime.repository
        name, used, total = describe_device(repository.device, repository.entries())
        info = tf.ServerInfo(
            server_version=__version__,
            device=repository.device,
            device_name=name,
            device_memory_used=used,
            device_memory_total=total,
            host_pid=os.getpid(),
            draining=self.runtime.draining,
            insecure=self.insecure,
        )
        for entry in repository.entries():
            stats = self.runtime.stats(entry.name)
            info.models.add(
                name=entry.name,
                state=entry.state.value,
                queue_depth=self.runtime.queue_depth(entry.name),
                rows_done=stats.inference_count,
                artifact_sha256=entry.checksum,
                precision=entry.config.precision if entry.config else "",
                version=entry.config.version if entry.config else "",
            )
        return info

    async def Drain(self, request, context):
        in_flight = self.runtime.in_flight()
        self._on_drain()
        return tf.DrainResponse(in_flight=in_flight)
