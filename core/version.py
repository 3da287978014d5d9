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

__all__ = ["__version__"]
