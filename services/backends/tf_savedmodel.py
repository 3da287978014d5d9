"""Backend `tensorflow`: a TensorFlow SavedModel served through one of its signatures.

Keras 3 `model.export(path)` writes such a folder. Config input names are the signature's
input names and config output names its output names, so nothing is positional. The
model loads once, on the server's device, and runs each batch as one signature call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tensorfleet.core.errors import InvalidArgument

from .base import Backend
from .tf_common import (
    check_shape,
    configure_device,
    device_memory,
    import_tensorflow,
    reject_reduced_precision,
    to_numpy,
    to_tensor,
)

DEFAULT_DIR = "saved_model"
DEFAULT_SIGNATURE = "serving_default"
PRECISION_HINT = (
    "a SavedModel's compute dtype is fixed when it is exported (e.g. export under "
    "keras.mixed_precision.set_global_policy('mixed_bfloat16')); keep precision: fp32 here"
)


class SavedModelBackend(Backend):
    tf: Any = None
    loaded: Any = None
    signature: Any = None
    input_dtypes: dict[str, Any]
    device_name = "/CPU:0"

    def load(self) -> None:
        config = self.context.config
        reject_reduced_precision(config, "tensorflow", PRECISION_HINT)
        path = self.context.artifact(config.model_file or DEFAULT_DIR)
        if not (path / "saved_model.pb").is_file():
            raise InvalidArgument(
                f"model '{config.name}': {path} is not a SavedModel folder (no saved_model.pb)"
            )
        tf = self.tf = import_tensorflow()
        self.device_name = configure_device(tf, self.context.device)
        name = str(self.context.parameters.get("signature", DEFAULT_SIGNATURE))
        try:
            with tf.device(self.device_name):
                self.loaded = tf.saved_model.load(str(path))
        except Exception as error:  # a corrupt or foreign folder: one clear line, not a traceback
            raise InvalidArgument(
                f"model '{config.name}': cannot load SavedModel {path}: {type(error).__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            ) from None
        signatures = self.loaded.signatures
        if name not in signatures:
            raise InvalidArgument(
                f"model '{config.name}': SavedModel has no signature '{name}'; it has {sorted(signatures)}"
            )
        self.signature = signatures[name]
        self._check_io(name)

    def _check_io(self, signature_name: str) -> None:
        config = self.context.config
        _, saved_inputs = self.signature.structured_input_signature
        saved_outputs = self.signature.structured_outputs
        where = f"signature '{signature_name}'"
        configured = {spec.name for spec in config.inputs}
        missing = sorted(set(saved_inputs) - configured)
        unknown = sorted(configured - set(saved_inputs))
        if missing or unknown:
            raise InvalidArgument(
                f"model '{config.name}': config inputs must be the {where} inputs "
                f"{sorted(saved_inputs)}; unknown in config: {unknown}, missing from config: {missing}"
            )
        if not isinstance(saved_outputs, dict):
            raise InvalidArgument(f"model '{config.name}': {where} does not return named outputs")
        unknown = sorted({spec.name for spec in config.outputs} - set(saved_outputs))
        if unknown:
            raise InvalidArgument(
                f"model '{config.name}': outputs {unknown} are not among the {where} outputs {sorted(saved_outputs)}"
            )
        optional = [spec.name for spec in config.inputs if spec.optional]
        if optional:
            raise InvalidArgument(
                f"model '{config.name}': a signature needs every input; {optional} cannot be optional"
            )
        self.input_dtypes = {}
        for spec in config.inputs:
            saved = saved_inputs[spec.name]
            check_shape(config, spec, _dims(saved.shape), f"{where} input")
            self.input_dtypes[spec.name] = saved.dtype
        for spec in config.outputs:
            check_shape(config, spec, _dims(saved_outputs[spec.name].shape), f"{where} output")

    def predict(
        self, inputs: dict[str, np.ndarray], outputs: frozenset[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:  # TF computes every fetched output: `outputs` is not used
        tf = self.tf
        with tf.device(self.device_name):
            feeds = {
                spec.name: to_tensor(tf, spec, inputs[spec.name], self.input_dtypes[spec.name])
                for spec in self.context.config.inputs
            }
            result = self.signature(**feeds)
        return {spec.name: to_numpy(result[spec.name]) for spec in self.context.config.outputs}

    def unload(self) -> None:
        self.signature = None
        self.loaded = None

    def device_memory(self) -> tuple[int, int]:
        return device_memory(self.tf, self.context.device) if self.tf else (0, 0)


def _dims(shape: Any) -> list[int | None] | None:
    return None if shape.rank is None else list(shape.as_list())
