"""TLS credentials for servers and clients, from PEM files: one place for both services."""

from __future__ import annotations

from pathlib import Path

import grpc


def server_credentials(cert: str | Path | None, key: str | Path | None,
                       ca: str | Path | None = None) -> grpc.ServerCredentials | None:
    """TLS with --tls-cert/--tls-key; mutual TLS (client certificates required) with --tls-ca too."""
    if not cert and not key:
        if ca:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key (the server's own certificate)")
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(ca).read_bytes() if ca else None, require_client_auth=ca is not None,
    )


def channel_credentials(root_cert: str | Path | None = None, client_cert: str | Path | None = None,
                        client_key: str | Path | None = None) -> grpc.ChannelCredentials:
    """Client TLS: the CA to trust (system's when None), and a client certificate for mutual TLS."""

    def read(path: str | Path | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(root_cert), private_key=read(client_key), certificate_chain=read(client_cert),
    )
