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
