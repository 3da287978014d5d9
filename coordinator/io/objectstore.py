"""Object storage (fsspec URLs: s3://, gs://, ...) for a job's input and output.

The engine reads and writes local files (mmap, HDF5, the SQLite manifest stays on local disk),
so an input URL is copied once into the job folder, and the merged output is written there
and then uploaded. An object store shows an uploaded object only once it is complete (S3
PUT and multipart uploads are atomic), so a killed upload never leaves a finished-looking
output; a resume uploads again. A staged input is downloaded again when its ETag changed,
and the engine's input fingerprint check then refuses to mix old and new rows.

Credentials and endpoints come from the storage's usual settings (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorfleet.core.extras import URL_MODULES, install_hint

STAGE_DIR = "objects"


class ObjectStoreError(Exception):
    """An object that cannot be read or written; the message names it."""


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec ships with the io extra
        raise ObjectStoreError(f"{url}: object storage needs fsspec, which is not installed: "
                               f"{install_hint('fsspec')}") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:
        raise ObjectStoreError(f"{url}: {scheme_hint(url, error)}") from None
    except ValueError as error:
        raise ObjectStoreError(f"{url}: {error}") from None


def scheme_hint(url: str, error: ImportError) -> str:
    """Why a URL's filesystem could not load, and the extra that brings it (s3:// -> s3fs: [s3])."""
    module = URL_MODULES.get(url.partition("://")[0].lower()) or error.name
    if not module:
        return str(error)
    return f"{url.partition('://')[0]}:// URLs need {module}, which is not installed: {install_hint(module)}"


def _version(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified"):
        if info.get(key):
            return str(info[key])
    return str(info.get("size"))


def stage_input(url: str, folder: Path) -> Path:
    """A local copy of `url` in `folder`, downloaded when missing or when the object changed."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise ObjectStoreError(f"input {url} does not exist; fix input.path") from None
    except OSError as error:
        raise ObjectStoreError(f"cannot read input {url}: {error}") from None
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / Path(path).name
    record = folder / (local.name + ".source.json")
    wanted = {"url": url, "version": _version(info), "size": info.get("size")}
    if local.is_file() and record.is_file() and json.loads(record.read_text()) == wanted:
        return local
    temp = local.with_name(local.name + ".download")
    try:
        fs.get(path, str(temp))
    except OSError as error:
        raise ObjectStoreError(f"cannot download input {url}: {error}") from None
    os.replace(temp, local)
    record.write_text(json.dumps(wanted))
    return local


def upload(local: Path, url: str) -> None:
    fs, path = filesystem(url)
    try:
        fs.put(str(local), path)
    except OSError as error:
        raise ObjectStoreError(f"cannot upload {local} to {url}: {error}") from None


@dataclass
class RemoteOutput:
    """Where the merged output goes, and the local folder the merge writes it in first."""

    url: str
    local_dir: Path

    def upload_all(self, output: Path) -> list[str]:
        """Upload the output and its side files (same stem); side files first, the output last."""
        base = self.url.rsplit("/", 1)[0]
        files = sorted(p for p in self.local_dir.iterdir() if p.is_file() and p.name.startswith(output.stem)
                       and not p.name.startswith("."))
        files.sort(key=lambda p: p == output)
        uploaded = []
        for file in files:
            target = f"{base}/{file.name}"
            upload(file, target)
            uploaded.append(target)
        return uploaded


def stage_dir(job_dir: Path) -> Path:
    """Beside the job folder, so `--restart` (which empties the job folder) keeps the staged input."""
    return job_dir.with_name(job_dir.name + "." + STAGE_DIR)


def localize(spec: Any, job_dir: Path) -> tuple[Any, RemoteOutput | None]:
    """The spec with URL inputs staged locally and URL outputs written locally first."""
    updates: dict[str, Any] = {}
    if is_url(spec.input.path):
        local = stage_input(spec.input.path, stage_dir(job_dir) / "input")
        updates["input"] = spec.input.model_copy(update={"path": str(local)})
    remote = None
    if is_url(spec.output.path):
        local_dir = stage_dir(job_dir) / "output"
        local_dir.mkdir(parents=True, exist_ok=True)
        remote = RemoteOutput(spec.output.path, local_dir)
        updates["output"] = spec.output.model_copy(update={"path": str(local_dir / spec.output.path.rsplit("/", 1)[-1])})
    return (spec.model_copy(update=updates) if updates else spec), remote
