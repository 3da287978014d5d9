"""Channel construction shared by the sync and async clients: TLS, token, message limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from tensorfleet.core.settings import channel_options
from tensorfleet.core.tls import channel_credentials


@dataclass(frozen=True)
class ConnectionOptions:
    """How to reach a server. Paths are PEM files."""

    token: str | None = None
    tls: bool = False
    root_cert: str | Path | None = None
    client_cert: str | Path | None = None
    client_key: str | Path | None = None
    server_name: str | None = None  # TLS name override, for certificates made for another host
    max_message_bytes: int | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.root_cert or self.client_cert):
            return None
        return channel_credentials(self.root_cert, self.client_cert, self.client_key)

    def grpc_options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = list(channel_options(self.max_message_bytes))
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options


def sync_channel(address: str, options: ConnectionOptions) -> grpc.Channel:
    credentials = options.credentials()
    if credentials is None:
        return grpc.insecure_channel(address, options=options.grpc_options())
    return grpc.secure_channel(address, credentials, options=options.grpc_options())


def aio_channel(address: str, options: ConnectionOptions) -> grpc.aio.Channel:
    credentials = options.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options.grpc_options())
    return grpc.aio.secure_channel(address, credentials, options=options.grpc_options())
