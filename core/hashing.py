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


#: (path, inode, size, mtime_ns, ctime_ns) -> sha256, for file_sha256_once.
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256_once(path: Path | str) -> str:
    """file_sha256, read once per process while the file's inode, size, mtime and ctime stay the
    same: a run fingerprints each input for its job identity and again for its plan (or its
    resume check), and a 10 GB input should be read once, not twice."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]
