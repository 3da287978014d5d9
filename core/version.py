"""The installed tensorfleet version, read once from the package metadata.

Servers report it in ServerMetadata, the coordinator stores it in each job's manifest, and the
client SDK exports it as `tensorfleet.client.__version__`.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__: str = metadata.version("tensorfleet")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

#: The revision of what a coordinator and a server of tensorfleet expect of each other beyond
#: the Open Inference Protocol (request parameters, ragged outputs, shared memory, contexts).
#: A server names it in ServerMetadata's extensions as PROTOCOL_EXTENSION + N; a coordinator
#: refuses, at start-up, a server whose revision differs (one started from another environment).
#: Raise it with any change that an older peer would misread.
PROTOCOL_VERSION = 1
PROTOCOL_EXTENSION = "tensorfleet_protocol_v"

__all__ = ["PROTOCOL_EXTENSION", "PROTOCOL_VERSION", "__version__"]
