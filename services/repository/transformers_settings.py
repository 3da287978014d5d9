"""The `transformers:` section of a model's config.yaml (backend `transformers`).

Kept apart from model_config.py so the schema of the Hugging Face backend reads in one place;
model_config.py holds only the field that points here. See docs/workloads.md, "Serve a Hugging
Face model".
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Pooling = Literal["mean", "cls", "last"]


class TransformersSettings(BaseModel):
    """Which checkpoint, which class, and what the `embed` task returns."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    #: A folder (relative to the model folder, or absolute), or a repo id (`org/name`) that must
    #: already be in the local Hugging Face cache: nothing is ever downloaded.
    path: str = Field(min_length=1)
    #: A branch, tag or commit of a cached repo id (its snapshot in the cache); unset: main.
    revision: str | None = None
    #: The transformers class that loads the folder: AutoModel, EsmModel, T5EncoderModel, ...
    class_name: str = Field(default="AutoModel", alias="class", pattern=r"^[A-Z][A-Za-z0-9_]*$")
    #: The tokenizer folder (default: the checkpoint's own), or `none` for integer token ids in.
    tokenizer: str | None = None
    #: Run the Python code a checkpoint ships (HyenaDNA, Caduceus). Honoured here only: in the
    #: operator's own model repository, never from a job or a request (see docs/security.md).
    trust_remote_code: bool = False
    task: Literal["embed"] = "embed"
    #: Change each text's case before tokenizing: ESM's vocabulary holds upper-case residues
    #: only (a lower-case protein would be one <unk>), k-mer vocabularies are often upper too.
    case: Literal["keep", "upper", "lower"] = "keep"
    #: Which hidden state the outputs come from: -1 the last layer, 0 the embeddings, N layer N.
    layer: int = -1
    #: With an output named `hidden_states`: per-token states of this layer (same numbering).
    hidden_states_layer: int | None = None
    #: Tokens a row may have, special tokens included; unset: the model's own limit.
    max_length: int | None = Field(default=None, ge=1)
    #: A row longer than max_length: truncate it, or fail that row alone (INVALID_ARGUMENT).
    over_length: Literal["truncate", "error"] = "truncate"
    #: Expected sha256 of files in the checkpoint folder (config.json, weights...): a changed
    #: checkpoint is a clear load error, as for any backend's artifacts.
    checksums: dict[str, str] = Field(default_factory=dict)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("tokenizer: a folder, a repo id, or 'none'")
        return value
