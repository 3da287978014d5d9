"""The model configuration file (`config.yaml` in each model folder), validated by pydantic.

Shapes exclude the batch dimension when `max_batch_size > 0` (as in Triton); -1 marks a
variable dimension. See docs/model-repository.md for the documented format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tensorfleet.core.codec import DATATYPES
from tensorfleet.core.errors import InvalidArgument

from .repository.transformers_settings import TransformersSettings

CONFIG_FILENAME = "config.yaml"
Precision = Literal["fp32", "fp16", "bf16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    """One input or output tensor, per row (batch dimension excluded)."""

    name: str = Field(min_length=1)
    datatype: str
    shape: list[int] = Field(default_factory=list)
    #: Ragged inputs may differ in their variable (-1) dimension between requests; the batcher
    #: pads them to the longest in the batch with `pad_value`. Ragged outputs are cut back to
    #: each request's own length along the same axis.
    ragged: bool = False
    pad_value: float = 0
    optional: bool = False
    #: Longest row this input takes (BYTES: bytes per element, else the -1 dimension). Told to
    #: clients in ModelConfig.parameters as `max_length.<input>`; the coordinator applies a
    #: job's input.over_length policy to it. The server does not enforce it: the model does.
    max_length: int | None = Field(default=None, ge=1)
    #: `csr`: the input's rows travel as CSR (values, column indices, row offsets: three tensors,
    #: core/sparse.py, docs/protocol.md) and the model gets a `scipy.sparse.csr_matrix`
    #: (python backend) or a `torch.sparse_csr_tensor` (torch backends). Rows of shape [columns].
    sparse: Literal["csr"] | None = None

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in DATATYPES:
            raise ValueError(f"unknown datatype '{value}'; expected one of {sorted(DATATYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: list[int]) -> list[int]:
        if any(dim < -1 or dim == 0 for dim in value):
            raise ValueError(f"shape {value}: dimensions are positive, or -1 for variable")
        return value

    @model_validator(mode="after")
    def _ragged_needs_variable_dim(self) -> TensorSpec:
        if self.ragged and -1 not in self.shape and self.datatype != "BYTES":
            raise ValueError(f"tensor '{self.name}' is ragged but has no variable (-1) dimension")
        if self.sparse and (len(self.shape) != 1 or self.shape[0] < 1 or self.ragged
                            or self.datatype in ("BYTES", "BF16", "BOOL")):
            raise ValueError(f"tensor '{self.name}': sparse: csr takes numeric rows of one fixed dimension "
                             f"(shape [columns]), not {self.datatype} {self.shape}")
        return self


class BatchingPolicy(_Strict):
    max_queue_delay_ms: float = Field(default=2.0, ge=0)
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    #: Requests waiting; one more gets RESOURCE_EXHAUSTED.
    max_queue_size: int = Field(default=4096, ge=1)
    #: Upper bound on rows x padded length for a batch (ragged or BYTES inputs); 0 = rows only.
    token_budget: int = Field(default=0, ge=0)
    #: Lengths are grouped into buckets of this width so batches reuse a few shapes.
    length_bucket: int = Field(default=32, ge=1)
    #: Pad each merged batch's ragged inputs up to a multiple of `length_bucket`, so batches
    #: come in few (rows x length) shapes: on a GPU each new shape costs tens of ms once.
    pad_to_bucket: bool = False
    #: (rows, padded length) shapes run before SERVING, built from the first `warmup` example
    #: (ragged inputs repeated to that length): the common batches then meet warm kernels.
    warmup_shapes: list[tuple[int, int]] = Field(default_factory=list)

    @field_validator("warmup_shapes")
    @classmethod
    def _positive_shapes(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if any(rows < 1 or length < 1 for rows, length in value):
            raise ValueError(f"{value}: each shape is [rows, length], both at least 1")
        return value


class PythonClass(_Strict):
    module: str = "model.py"
    class_name: str = Field(default="Model", alias="class")


class FeatureList(_Strict):
    """The names of one input's columns (e.g. the genes a single-cell model was trained on)."""

    #: A text file in the model folder: one name per line, in the input's column order.
    file: str = Field(min_length=1)
    #: The input they name the last axis of; unset: the model's only input.
    input: str | None = None


class ModelConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    backend: str
    version: str = "1"
    description: str = ""
    max_batch_size: int = Field(default=0, ge=0)
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    batching: BatchingPolicy = Field(default_factory=BatchingPolicy)
    precision: Precision = "fp32"
    #: artifact file name (relative to the model folder) -> sha256 hex digest.
    artifacts: dict[str, str] = Field(default_factory=dict)
    #: For backend torchscript / torch_export: which artifact holds the program.
    model_file: str | None = None
    python: PythonClass = Field(default_factory=PythonClass)
    #: For backend transformers: the checkpoint and what the embed task returns.
    transformers: TransformersSettings | None = None
    #: Free-form settings handed to the backend (e.g. max_length for a tokenizer).
    parameters: dict[str, Any] = Field(default_factory=dict)
    #: Example inputs (one row each, name -> nested list / strings) run before SERVING.
    warmup: list[dict[str, Any]] = Field(default_factory=list)
    #: The model's feature list; jobs over .h5ad inputs align their genes to it.
    features: FeatureList | None = None

    @model_validator(mode="after")
    def _warmup_shapes_fit(self) -> ModelConfig:
        shapes = self.batching.warmup_shapes
        if shapes and not self.warmup:
            raise ValueError("batching.warmup_shapes needs a `warmup` example to build the batches from")
        too_big = [rows for rows, _ in shapes if rows > max(self.max_batch_size, 1)]
        if too_big:
            raise ValueError(f"batching.warmup_shapes: {too_big} rows exceed max_batch_size {self.max_batch_size}")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> ModelConfig:
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [spec.name for spec in specs]
            if len(names) != len(set(names)):
                raise ValueError(f"{kind} names repeat: {names}")
        return self

    @model_validator(mode="after")
    def _features_input(self) -> ModelConfig:
        if self.features is None:
            return self
        if self.features.input is None:
            if len(self.inputs) != 1:
                raise ValueError("features.input: name the input the feature list is for (the model has several)")
            self.features.input = self.inputs[0].name
        spec = self.input(self.features.input)
        if spec is None:
            raise ValueError(f"features.input: no input '{self.features.input}'")
        if not spec.shape or spec.datatype == "BYTES":
            raise ValueError(f"features.input: input '{spec.name}' has no feature axis (a numeric shape [N])")
        return self

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.outputs if spec.name == name), None)


def load_config(model_dir: Path) -> ModelConfig:
    """Read and validate `config.yaml`; every problem becomes one InvalidArgument naming the field."""
    path = model_dir / CONFIG_FILENAME
    if not path.is_file():
        raise InvalidArgument(f"{path}: missing model config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise InvalidArgument(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{path}: expected a mapping at the top level")
    try:
        config = ModelConfig.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or '(top)'}: {item['msg']}" for item in error.errors()
        )
        raise InvalidArgument(f"{path}: {problems}") from None
    if config.name != model_dir.name:
        raise InvalidArgument(
            f"{path}: name '{config.name}' differs from its folder name '{model_dir.name}'"
        )
    return config


def read_features(model_dir: Path, config: ModelConfig) -> list[str]:
    """The declared feature list, checked against its input's width; [] when none is declared."""
    if config.features is None:
        return []
    path = model_dir / config.features.file
    if not path.is_file() or not path.resolve().is_relative_to(model_dir.resolve()):
        raise InvalidArgument(f"{model_dir / CONFIG_FILENAME}: features.file {config.features.file} is not a file in the model folder")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    spec = config.input(config.features.input or "")
    width = spec.shape[-1] if spec is not None and spec.shape else -1
    if width != -1 and width != len(names):
        raise InvalidArgument(
            f"{path}: {len(names)} feature names, but input '{spec.name}' is {width} wide"  # type: ignore[union-attr]
        )
    if len(set(names)) != len(names):
        raise InvalidArgument(f"{path}: feature names repeat; each column needs its own name")
    return names
