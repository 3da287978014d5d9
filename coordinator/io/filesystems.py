"""Which filesystem a job folder lives on, and so how its SQLite manifest may journal.

SQLite's WAL mode needs shared memory between the processes that open the database, which
network and cluster filesystems (NFS, Lustre, GPFS, CIFS, BeeGFS, CephFS...) do not give
across hosts. There the manifest uses the rollback journal (DELETE), whose locking only
needs the filesystem's own file locks; every local filesystem keeps WAL.
"""

from __future__ import annotations

import os
from pathlib import Path

NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "glusterfs", "fuse.glusterfs",
     "fuse.sshfs", "panfs", "afs", "9p", "wekafs", "fuse.juicefs", "fuse.cephfs", "orangefs", "pvfs2"}
)


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in octal (\\040...)."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the filesystem holding `path` (longest mount point above it), '' if unknown.
    `mounts`: the text of /proc/mounts (read when not given)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    target = os.path.realpath(path)
    best, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def is_network_filesystem(path: Path, mounts: str | None = None) -> bool:
    return filesystem_type(path, mounts) in NETWORK_FILESYSTEMS


def journal_mode_for(path: Path, mounts: str | None = None) -> str:
    """'WAL' on a local filesystem, 'DELETE' (rollback journal) on a network or cluster one."""
    return "DELETE" if is_network_filesystem(path, mounts) else "WAL"


def is_disk_full(error: BaseException) -> bool:
    """A write failed for want of space or quota (OSError ENOSPC/EDQUOT, or SQLite's own report)."""
    import errno
    import sqlite3

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, sqlite3.OperationalError) and "full" in str(error)
