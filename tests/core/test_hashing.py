"""One sha256 for artifacts (server) and input fingerprints (coordinator): blockwise equals whole."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tensorfleet.core.hashing import file_sha256


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_blockwise_digest_equals_hashlib_over_the_whole_file(tmp_path: Path, size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    path = tmp_path / "blob"
    path.write_bytes(data[:size])
    assert file_sha256(path, block=4096) == hashlib.sha256(data[:size]).hexdigest()
    assert file_sha256(str(path)) == file_sha256(path, block=7)
