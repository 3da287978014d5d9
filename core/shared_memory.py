"""The system shared-memory extension's names and key rules, the same on client and server.

Parameter names (Triton's, plus our fallback flag), where objects live, and the rule that
makes an SDK-created key `/tensorfleet-PID-N`: so a server's sweep and the next client on the
host can tell an object whose creating process died and unlink it. The same rules as
Triton's for keys: a plain name in /dev/shm, never a path.
"""

from __future__ import annotations

import contextlib
import os
import re

from .errors import InvalidArgument

REGION_PARAMETER = "shared_memory_region"
BYTE_SIZE_PARAMETER = "shared_memory_byte_size"
OFFSET_PARAMETER = "shared_memory_offset"
#: A request parameter of ours: an output that does not fit its window travels in the reply.
FALLBACK_PARAMETER = "tensorfleet.shared_memory_fallback"

SHM_DIR = "/dev/shm"
KEY_PREFIX = "tensorfleet-"
_OWNED_KEY = re.compile(r"^/?tensorfleet-(\d+)-")
#: The server's words for a region it does not hold (services/shared_memory.py).
UNKNOWN_REGION = "unknown shared memory region"


def shm_path(key: str, region: str = "") -> str:
    """/dev/shm/NAME for a shm_open key "/NAME" or "NAME"; a separator, `..` or NUL is refused."""
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or "\\" in name or "\0" in name or name in (".", "..") or ".." in name \
            or len(name) > 255:
        where = f"shared memory region '{region}': " if region else ""
        raise InvalidArgument(f"{where}key {key!r} is not a plain shared-memory name (no separators or '..')")
    return os.path.join(SHM_DIR, name)


def owner_pid(key: str) -> int | None:
    """The process that created a tensorfleet SDK key (`/tensorfleet-PID-...`), else None."""
    match = _OWNED_KEY.match(key)
    return int(match.group(1)) if match else None


def owner_alive(key: str) -> bool:
    """False only for a tensorfleet key whose creating process no longer exists on this host."""
    pid = owner_pid(key)
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def remove_stale_objects() -> int:
    """Unlink /dev/shm/tensorfleet-PID-* objects whose process died; how many were removed."""
    removed = 0
    with contextlib.suppress(OSError):
        for name in os.listdir(SHM_DIR):
            if name.startswith(KEY_PREFIX) and not owner_alive(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(SHM_DIR, name))
                    removed += 1
    return removed
