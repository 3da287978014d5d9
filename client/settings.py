"""Transport settings client and server agree on, re-exported from tensorfleet.core.settings.

Kept so that `tensorfleet.client.settings` imports keep working for users."""

from tensorfleet.core.settings import (
    MAX_MESSAGE_BYTES,
    channel_options,
    server_options,
)

__all__ = [
    "channel_options",
    "MAX_MESSAGE_BYTES",
    "server_options",
]
