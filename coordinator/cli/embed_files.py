"""The files `tensorfleet embed` writes: a model repository serving a Hugging Face checkpoint
with backend `transformers`, and an ordinary job file that uses it.

Both are plain files the user may edit and run again with `tensorfleet run`; nothing here
imports the server or transformers (config.json is read as JSON; a repo id is looked up in the
local cache with huggingface_hub, offline).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

POOLS = ("mean", "cls", "last")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class EmbedError(ValueError):
    """A checkpoint or an option `tensorfleet embed` cannot use; the message says what to fix."""


@dataclass
class EmbedRequest:
    model: str
    input: Path
    output: Path
    pools: list[str] = field(default_factory=lambda: ["mean"])
    per_token: bool = False
    gpus: str = "auto"
    servers: list[str] = field(default_factory=list)
    name: str | None = None
    revision: str | None = None
    model_class: str = "AutoModel"
    tokenizer: str | None = None
    layer: int = -1
    precision: str = "fp32"
    max_length: int | None = None
    over_length: str = "truncate"
    trust_remote_code: bool = False
    token_budget: int = 16384
    max_batch_size: int = 64
    column: str | None = None
    ids: str | None = None
    threads: int | None = None
    chunk_rows: int = 1024


def checkpoint_folder(model: str, revision: str | None) -> Path:
    """The folder holding config.json: MODEL itself, or a repo id's snapshot in the local cache."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise EmbedError(f"{folder} holds no config.json: not a Hugging Face checkpoint folder")
        return folder.resolve()
    if not _REPO_ID.match(model):
        raise EmbedError(f"{model}: no such folder, and not a hub repo id (org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise EmbedError(f"{model}: a repo id needs huggingface_hub; pip install 'tensorfleet[hf]'") from None
    try:
        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception as error:  # noqa: BLE001 - huggingface_hub's several "not cached" errors
        raise EmbedError(f"{model}: not in the local Hugging Face cache (nothing is downloaded; fetch it with "
                         f"`hf download {model}` where there is network): {type(error).__name__}") from None


def hidden_size(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise EmbedError(f"{folder / 'config.json'}: no hidden_size (or d_model) to size the outputs by")


def model_name(request: EmbedRequest, folder: Path) -> str:
    base = request.name or (request.model.rsplit("/", 1)[-1] if not Path(request.model).is_dir() else folder.name)
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", base).strip("._") or "model"
    return name[:100]


def _characters_per_row(folder: Path, max_tokens: int | None) -> int | None:
    """For a tokenizer of one token per character (ESM's), the characters a row may have: the
    token limit less <cls> and <eos>. None for others (their token counts are not the text's)."""
    if _tokenizer_class(folder) != "EsmTokenizer":
        return None
    limit = max_tokens or json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
    return int(limit) - 2 if isinstance(limit, int) and limit > 2 else None


def _tokenizer_class(folder: Path) -> str:
    path = folder / "tokenizer_config.json"
    try:
        return str(json.loads(path.read_text()).get("tokenizer_class", "")) if path.is_file() else ""
    except (OSError, ValueError):
        return ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_model_repository(request: EmbedRequest, folder: Path, repository: Path) -> tuple[str, list[str]]:
    """models/NAME/config.yaml serving `folder`; (the model name, its output names)."""
    unknown = [p for p in request.pools if p not in POOLS]
    if unknown:
        raise EmbedError(f"--pool {','.join(unknown)}: choose from {', '.join(POOLS)}")
    if not request.pools and not request.per_token:
        raise EmbedError("nothing to compute: give --pool and/or --per-token")
    name = model_name(request, folder)
    width = hidden_size(folder)
    target = repository / name
    target.mkdir(parents=True, exist_ok=True)
    is_folder = Path(request.model).expanduser().is_dir()
    path = str(folder) if is_folder else request.model
    if request.trust_remote_code and is_folder:
        # the code must sit inside the model folder the server is started with: a link the user made
        link = target / "checkpoint"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(folder, target_is_directory=True)
        path = "checkpoint"
    section: dict[str, Any] = {"path": path}
    if request.revision and not is_folder:
        section["revision"] = request.revision
    if request.model_class != "AutoModel":
        section["class"] = request.model_class
    if request.tokenizer:
        section["tokenizer"] = request.tokenizer
    if request.trust_remote_code:
        section["trust_remote_code"] = True
    if request.layer != -1:
        section["layer"] = request.layer
    if request.max_length:
        section["max_length"] = request.max_length
    section["over_length"] = request.over_length
    if _tokenizer_class(folder) == "EsmTokenizer":
        section["case"] = "upper"  # ESM's vocabulary is upper-case residues; FASTA files may be lower
    section["checksums"] = {
        p.name: _sha256(p) for p in sorted(folder.iterdir())
        if p.is_file() and (p.name == "config.json" or p.suffix in _WEIGHT_SUFFIXES)
    }
    sequence: dict[str, Any] = {"name": "sequence", "datatype": "BYTES", "shape": []}
    residues = _characters_per_row(folder, request.max_length)
    if residues:  # one token per character: the job's input.over_length applies before sending
        sequence["max_length"] = residues
    outputs = [{"name": pool, "datatype": "FP32", "shape": [width]} for pool in request.pools]
    if request.per_token:
        outputs += [{"name": "per_token", "datatype": "FP32", "shape": [-1, width], "ragged": True},
                    {"name": "length", "datatype": "INT32", "shape": []}]
    doc = {
        "name": name,
        "backend": "transformers",
        "description": f"{request.model} served by `tensorfleet embed` (hidden size {width}).",
        "max_batch_size": request.max_batch_size,
        "transformers": section,
        "precision": request.precision,
        "inputs": [sequence],
        "outputs": outputs,
        "batching": {"max_queue_delay_ms": 2, "token_budget": request.token_budget, "length_bucket": 32},
    }
    header = "# Written by `tensorfleet embed`; edit freely (transformers.checksums pin the checkpoint's files).\n"
    (target / "config.yaml").write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return name, [o["name"] for o in outputs]


def job_document(request: EmbedRequest, name: str, outputs: list[str]) -> dict[str, Any]:
    """The job file: the input, the model on local servers (or --servers), the output."""
    model: dict[str, Any] = {"name": name}
    if request.servers:
        model["servers"] = list(request.servers)
    else:
        local: dict[str, Any] = {"repository": "models"}
        if request.gpus == "auto":
            local.update(count="auto", device="auto")
        elif int(request.gpus) > 0:
            local.update(count=int(request.gpus), device="cuda:0")
        else:
            local.update(count=1, device="cpu")
        if request.threads:
            local["args"] = ["--threads", str(request.threads)]
        model["local"] = local
    source: dict[str, Any] = {"path": str(request.input.resolve()), "over_length": request.over_length}
    if request.column:
        source["tensors"] = {"sequence": request.column}
    if request.ids:
        source["ids"] = request.ids
    output: dict[str, Any] = {"path": str(request.output.resolve()), "tensors": {o: o for o in outputs}}
    if request.per_token:
        output["ragged"] = {"per_token": "length"}
    return {
        "name": f"embed-{name}",
        "input": source,
        "model": model,
        "output": output,
        "chunking": {"token_budget": request.token_budget, "chunk_rows": request.chunk_rows},
    }


def write_embed_files(request: EmbedRequest, folder_for_files: Path) -> Path:
    """Write models/NAME/config.yaml and job.yaml under `folder_for_files`; the job file's path."""
    checkpoint = checkpoint_folder(request.model, request.revision)
    folder_for_files.mkdir(parents=True, exist_ok=True)
    name, outputs = write_model_repository(request, checkpoint, folder_for_files / "models")
    job = folder_for_files / "job.yaml"
    temp = job.with_name(job.name + ".tmp")
    temp.write_text("# Written by `tensorfleet embed`; run it again with `tensorfleet run` (add --resume).\n"
                    + yaml.safe_dump(job_document(request, name, outputs), sort_keys=False))
    os.replace(temp, job)
    return job
