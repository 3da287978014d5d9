"""The start-up check that a server speaks this coordinator's protocol revision.

A model's servers may run from another environment (`local.python`, `local.launcher`): another
venv, a conda env, a container image, each with its own copy of tensorfleet. A server whose
copy is older or newer than the coordinator's may misread what the coordinator sends, so the
coordinator asks each server's ServerMetadata once it is up and stops, with both versions named,
when they differ (exit 2: a fatal error found before the run).
"""

from __future__ import annotations

from tensorfleet.client import ConnectionOptions, InferenceClient
from tensorfleet.core.version import PROTOCOL_EXTENSION, PROTOCOL_VERSION, __version__


class ProtocolMismatch(Exception):
    """A server's protocol revision differs from this coordinator's; the message names both."""


def server_protocol(extensions: list[str]) -> int | None:
    """The revision a server names in its extensions; None for a server that names none."""
    for name in extensions:
        if name.startswith(PROTOCOL_EXTENSION) and name[len(PROTOCOL_EXTENSION):].isdigit():
            return int(name[len(PROTOCOL_EXTENSION):])
    return None


def check_protocol(address: str, options: ConnectionOptions | None = None, timeout: float = 30.0,
                   where: str = "") -> None:
    """Raise ProtocolMismatch unless the server at `address` speaks PROTOCOL_VERSION."""
    with InferenceClient(address, options=options, timeout=timeout) as client:
        metadata = client.server_metadata()
    found = server_protocol(list(metadata.extensions))
    if found == PROTOCOL_VERSION:
        return
    theirs = f"protocol version {found}" if found is not None else "no protocol version (an older tensorfleet)"
    raise ProtocolMismatch(
        f"the server at {address}{where} is tensorfleet {metadata.version or '?'} with {theirs}; this coordinator is "
        f"tensorfleet {__version__} with protocol version {PROTOCOL_VERSION}. Install the same tensorfleet in the "
        "server's environment (model.local.python / model.local.launcher) as in the coordinator's"
    )
