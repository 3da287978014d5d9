"""sha256 of a file, read in blocks: model artifact checksums (server) and input fingerprints
(coordinator manifests) must hash the same way, so both call this one function."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path | str, block: int = 8 << 20) -> str:
    """Hex sha256 of a file's bytes; memory stays at one block however large the file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while data := handle.read(block):
            digest.update(data)
    return digest.hexdigest()
