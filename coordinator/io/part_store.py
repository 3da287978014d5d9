"""Where a job's part files live: the local job folder, or an object store (`output.parts` URL).

The manifest records each committed part by name: a path relative to the job folder, or the
object's full URL. A remote part is written in one fsspec 'wb' stream and closed before its
manifest row is committed; S3 (and GCS) show an object only once its upload completed, so a
coordinator killed mid-write leaves no object, or an older one. An object with no manifest row
is never read: the chunk is computed again and its object overwritten.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .crashpoints import crash_point
from .objectstore import ObjectStoreError, filesystem, is_url
from .parts import CorruptPart, Part, checksum_of_file, encode_part, file_checksum, write_part

PARTS_DIR = "parts"


def part_name(index: int, parts_url: str | None) -> str:
    """The name the manifest records for chunk `index`'s part."""
    file = f"chunk-{index:07d}.part"
    return f"{parts_url.rstrip('/')}/{file}" if parts_url else f"{PARTS_DIR}/{file}"


def store_part(job_dir: Path, name: str, arrays: dict[str, np.ndarray], strings: dict[str, np.ndarray]) -> str:
    """Write a part completely (local: temp, fsync, rename; remote: one upload, closed).
    Returns its checksum, for the manifest."""
    if not is_url(name):
        checksum = write_part(job_dir / name, arrays, strings)
        crash_point("part_renamed")  # durable under its name, its manifest row not yet committed
        return checksum
    fs, path = filesystem(name)
    pieces = encode_part(arrays, strings)
    try:
        with fs.open(path, "wb") as handle:
            for piece in pieces:
                handle.write(piece)
    except OSError as error:
        raise ObjectStoreError(f"cannot write part {name}: {error}") from None
    return file_checksum(pieces)


def damaged_parts(job_dir: Path, recorded: dict[int, tuple[str, str | None]]) -> dict[int, str]:
    """Of the committed local parts (`recorded`: chunk -> (name, checksum)), those missing, or
    whose bytes differ from the checksum the manifest recorded (a file truncated or corrupted
    while no coordinator ran), with why. Parts from before checksums were recorded are checked
    against their own header digest. Remote parts are not read here (their upload is atomic)."""
    damaged = {}
    for index, (name, checksum) in sorted(recorded.items()):
        if is_url(name):
            continue
        path = job_dir / name
        if not path.is_file():
            damaged[index] = f"{name} is missing"
            continue
        if checksum is not None:
            if checksum_of_file(path) != checksum:
                damaged[index] = f"{name} does not match the checksum in the manifest"
            continue
        try:
            Part(path, verify=True).close()
        except CorruptPart as error:
            damaged[index] = str(error)
    return damaged


def open_part(job_dir: Path, name: str, verify: bool = True) -> Part:
    """A committed part, read back by mmap (local) or whole into memory (remote: one chunk at a time)."""
    if not is_url(name):
        return Part(job_dir / name, verify=verify)
    fs, path = filesystem(name)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ObjectStoreError(f"part {name} is missing from the object store; run with --restart") from None
    except OSError as error:
        raise ObjectStoreError(f"cannot read part {name}: {error}") from None
    return Part(name, verify=verify, data=bytes(data))


def missing_parts(job_dir: Path, names: dict[int, str]) -> list[int]:
    """Chunks (of `names`: chunk -> part) whose part is not there; one listing per remote folder."""
    missing, listed = [], {}
    for index, name in sorted(names.items()):
        if not is_url(name):
            if not (job_dir / name).is_file():
                missing.append(index)
            continue
        folder, file = name.rsplit("/", 1)
        if folder not in listed:
            fs, path = filesystem(folder)
            try:
                fs.invalidate_cache(path)
                listed[folder] = {entry.rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}
            except FileNotFoundError:
                listed[folder] = set()
            except OSError as error:
                raise ObjectStoreError(f"cannot list parts in {folder}: {error}") from None
        if file not in listed[folder]:
            missing.append(index)
    return missing
