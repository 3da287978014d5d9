"""Transport settings that client and server must agree on, kept in one place."""

from __future__ import annotations

import os

#: Largest gRPC message either side sends or accepts. Real tensors (per-residue
#: embeddings of a large batch) run to hundreds of MB. Override with TENSORFLEET_MAX_MESSAGE_MB.
MAX_MESSAGE_BYTES: int = int(os.environ.get("TENSORFLEET_MAX_MESSAGE_MB", "512")) * 1024 * 1024


def channel_options(max_message_bytes: int | None = None) -> list[tuple[str, int]]:
    """gRPC channel/server options for message limits and keepalive."""
    limit = max_message_bytes or MAX_MESSAGE_BYTES
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def server_options(max_message_bytes: int | None = None) -> list[tuple[str, int]]:
    """Server options: the channel's, plus acceptance of the clients' keepalive pings.

    Clients ping every 30 s while a call waits; with gRPC's server defaults (5 min between
    pings, 2 strikes) a request that computes for over 2 minutes would be cut off with
    'Too many pings'.
    """
    return [
        *channel_options(max_message_bytes),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]
