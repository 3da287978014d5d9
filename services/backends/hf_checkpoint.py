"""Finding a Hugging Face checkpoint on local disk, and fingerprinting it.

A `transformers.path` is a folder (relative to the model folder, or absolute) or a repo id that
must already sit in the local Hugging Face cache (`huggingface_hub`, `local_files_only`): a
server never downloads anything, so a GPU node without network serves exactly what the
operator put there. The fingerprint (sha256 over config.json and the weight files) goes into
the model's provenance with the config.yaml checksum.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from tensorfleet.core.errors import InvalidArgument
from tensorfleet.core.hashing import file_sha256

from ..repository.transformers_settings import TransformersSettings

#: The optional dependency group that brings transformers and safetensors.
EXTRA_HINT = "install the optional extra: pip install 'tensorfleet[hf]' (transformers, safetensors)"

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
#: Files whose bytes decide what the model computes.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


def is_repo_id(path: str) -> bool:
    """`org/name`, the form a hub repo id takes (never an absolute or dotted path)."""
    return bool(_REPO_ID.match(path)) and ".." not in path


def resolve_checkpoint(model_dir: Path, settings: TransformersSettings, what: str) -> Path:
    """The checkpoint folder `settings.path` names; InvalidArgument saying where it looked."""
    folder = Path(settings.path) if Path(settings.path).is_absolute() else model_dir / settings.path
    if folder.is_dir():
        if settings.revision:
            raise InvalidArgument(f"{what}: transformers.revision is for a cached repo id; {folder} is a folder")
        if settings.trust_remote_code:
            _check_code_folder(model_dir, settings.path, what)
        return folder
    if not is_repo_id(settings.path):
        raise InvalidArgument(f"{what}: transformers.path {settings.path!r} is neither a folder ({folder} does not "
                              "exist) nor a hub repo id of the form org/name")
    return cached_snapshot(settings.path, settings.revision, what)


def _check_code_folder(model_dir: Path, path: str, what: str) -> None:
    """trust_remote_code runs the checkpoint's own .py files: they must sit in the operator's
    model folder (a relative path, no '..'), next to the config.yaml that asked for it."""
    parts = Path(path).parts
    if Path(path).is_absolute() or ".." in parts:
        raise InvalidArgument(
            f"{what}: transformers.trust_remote_code runs code from the checkpoint folder, so the folder must be "
            f"inside the model folder (a relative transformers.path, e.g. a symlink the operator placed there), "
            f"not {path!r}"
        )


def cached_snapshot(repo_id: str, revision: str | None, what: str) -> Path:
    """The snapshot folder of a repo id in the local cache (HF_HUB_CACHE / HF_HOME)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise InvalidArgument(f"{what}: a repo id needs huggingface_hub; {EXTRA_HINT}") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as error:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        at = f" at revision {revision}" if revision else ""
        raise InvalidArgument(
            f"{what}: repo {repo_id}{at} is not in the local Hugging Face cache ({cache}); servers never "
            f"download: fetch it where there is network (`hf download {repo_id}`) and copy the cache, or point "
            f"transformers.path at a folder ({type(error).__name__}: {error})"
        ) from None


def checkpoint_fingerprint(folder: Path, expected: dict[str, str], what: str) -> str:
    """sha256 over config.json and every weight file; each file in `expected` must match it."""
    names = {
        p.name for p in folder.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix in _WEIGHT_SUFFIXES)
    }
    digests: dict[str, str] = {}
    for name in sorted(names | set(expected)):
        path = folder / name
        if not path.is_file():
            raise InvalidArgument(f"{what}: transformers.checksums names {name}, which is not in {folder}")
        digests[name] = file_sha256(path)
        if name in expected and digests[name] != expected[name].lower():
            raise InvalidArgument(f"{what}: {path} has sha256 {digests[name]}, config expects {expected[name]}")
    combined = hashlib.sha256()
    for name, digest in sorted(digests.items()):
        combined.update(f"{name}:{digest}\n".encode())
    return combined.hexdigest()
