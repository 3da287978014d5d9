"""Placing a job's finished output files: created, or replacing only what tensorfleet wrote, in a
folder checked when it is opened (issue 28, findings 4 and 5).

- **Ownership.** Every file placed here gets a marker beside it, `.NAME.tensorfleet-output`,
  recording the file's device and inode. An existing file is replaced only when its marker names
  that very file: a user's file, the coordinator's own `coordinator.sqlite`, or a file someone put
  in place of an old output is refused with an error that says what to do. `--restart` of a job
  replaces its own earlier output (the marker matches) as before.
- **Open-time checks.** A job submitted to the coordinator service had its paths checked when it
  was submitted; it may run much later. The service tells its engines the output roots
  ($TENSORFLEET_OUTPUT_ROOTS); the output folder is then resolved again when the output is placed,
  checked against those roots, and opened component by component with O_NOFOLLOW. Everything
  after that goes through the open folder (`/proc/self/fd/N/NAME`, `*_dir_fd` calls), so a folder
  swapped for a symlink after the check is not written through.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

from ..spec.errors import JobFatal

#: Output roots the coordinator service allows its jobs (os.pathsep-separated); unset for `tensorfleet run`.
OUTPUT_ROOTS_ENV = "TENSORFLEET_OUTPUT_ROOTS"
MARKER_SUFFIX = ".tensorfleet-output"


def marker_name(name: str) -> str:
    return f".{name}{MARKER_SUFFIX}"


def output_roots() -> list[Path] | None:
    """The roots the service set for this engine, or None (a person's own run: no root check)."""
    value = os.environ.get(OUTPUT_ROOTS_ENV)
    if value is None:
        return None
    return [Path(root) for root in value.split(os.pathsep) if root]


def check_within_roots(path: Path, what: str, roots: list[Path] | None = None) -> Path:
    """`path` resolved now (symlinks, `..`), refused unless under one of the service's output roots."""
    roots = output_roots() if roots is None else roots
    real = Path(os.path.realpath(path))
    if roots is not None and not any(real == root or real.is_relative_to(root) for root in roots):
        shown = ", ".join(str(root) for root in roots) or "none"
        raise JobFatal(f"{what} {path} resolves now to {real}, outside the coordinator's --output-root ({shown}); "
                       "was a folder replaced by a symlink after the job was submitted?")
    return real


def _open_no_follow(real: Path) -> int:
    """Open the folder `real` (already resolved) one component at a time, never following a symlink."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in real.parts[1:]:
            try:
                next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as error:
                raise JobFatal(f"output folder {real}: '{part}' changed while it was opened ({error.strerror}); "
                               "a symlink put in place of a folder is not followed") from None
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


class OutputFolder:
    """One output folder, held open: write through `at(name)`, place files with `replace`."""

    def __init__(self, folder: Path, create: bool = True) -> None:
        self.path = folder
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        roots = output_roots()
        if roots is None:
            self.fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        else:
            self.fd = _open_no_follow(check_within_roots(folder, "output folder", roots))

    @classmethod
    def existing(cls, folder: Path) -> OutputFolder:
        """An existing folder, opened the same way, never created."""
        return cls(folder, create=False)

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def at(self, name: str) -> Path:
        """A path to `name` inside the open folder, whatever its path names now (Linux /proc/self/fd)."""
        return Path(f"/proc/self/fd/{self.fd}") / name

    def _stat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def check_replaceable(self, name: str) -> None:
        """Refuse to replace `name` unless it is absent or a file tensorfleet placed (its marker matches)."""
        shown = self.path / name
        if name.startswith(".") and name.endswith(MARKER_SUFFIX):
            raise JobFatal(f"output {shown}: names ending in {MARKER_SUFFIX} are tensorfleet's ownership markers")
        info = self._stat(name)
        if info is None:
            return
        if not stat.S_ISREG(info.st_mode):
            raise JobFatal(f"output {shown} exists and is not a regular file (a symlink or a folder); "
                           "tensorfleet replaces only files it wrote")
        if self._marker(name) != (info.st_dev, info.st_ino):
            raise JobFatal(f"output {shown} exists and tensorfleet did not write it (no matching "
                           f"{marker_name(name)} beside it); move it away or choose another output path")

    def _marker(self, name: str) -> tuple[int, int] | None:
        try:
            fd = os.open(marker_name(name), os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.fd)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as handle:
                record = json.loads(handle.read(4096))
            return int(record["dev"]), int(record["ino"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def replace(self, temp_name: str, name: str) -> None:
        """Move the finished `temp_name` to `name` (checked first), then record the ownership marker."""
        self.check_replaceable(name)
        os.replace(temp_name, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        info = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        record = json.dumps({"written_by": "tensorfleet", "file": name, "dev": info.st_dev, "ino": info.st_ino})
        temp_marker = marker_name(name) + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_marker, dir_fd=self.fd)
        fd = os.open(temp_marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=self.fd)
        with os.fdopen(fd, "w") as handle:
            handle.write(record + "\n")
        os.replace(temp_marker, marker_name(name), src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink_owned(self, name: str) -> None:
        """Remove a stale file of ours (and its marker); a file tensorfleet did not write is left alone."""
        info = self._stat(name)
        if info is None or not stat.S_ISREG(info.st_mode) or self._marker(name) != (info.st_dev, info.st_ino):
            return
        os.unlink(name, dir_fd=self.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker_name(name), dir_fd=self.fd)

    def fsync(self) -> None:
        os.fsync(self.fd)


def replace_refusal(path: Path) -> str:
    """Why `path` may not be written as an output ('' when it may): for an early answer (at submit, at
    plan). The check that counts is OutputFolder.check_replaceable, when the file is placed."""
    if not path.parent.is_dir():
        return ""
    try:
        with OutputFolder.existing(path.parent) as folder:
            folder.check_replaceable(path.name)
    except JobFatal as error:
        return str(error)
    except OSError:
        return ""
    return ""
