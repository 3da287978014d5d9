"""Backend `tensorflow_graph`: a TF1-style checkpoint (meta graph + variables) run in a session.

Older scientific models (DPAM's DOMASS classifier among them) were saved with
`tf.compat.v1.train.Saver`: a `.meta` graph with named placeholders and a checkpoint of
variables. They have no signature, so the config's `parameters` name the tensors:

    model_file: model.ckpt                      # checkpoint prefix; model.ckpt.meta beside it
    parameters:
      input_tensors: {features: "x:0"}          # config input -> placeholder (default "<name>:0")
      output_tensors: {probabilities: "Softmax:0"}
      constant_feeds: {"keep_prob:0": 1.0}      # fed on every run, e.g. dropout off

One graph and one session per model, created at load and kept for the server's life.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tensorfleet.core.codec import bf16_words_to_float32
from tensorfleet.core.errors import InvalidArgument

from .base import Backend
from .tf_common import (
    check_shape,
    configure_device,
    device_memory,
    import_tensorflow,
    reject_reduced_precision,
    to_numpy,
)

DEFAULT_PREFIX = "model.ckpt"
PRECISION_HINT = "a TF1 graph's dtypes are fixed in the saved graph; keep precision: fp32"


class GraphCheckpointBackend(Backend):
    tf: Any = None
    session: Any = None
    feeds: dict[str, Any]
    fetches: list[Any]
    constants: dict[Any, Any]

    def load(self) -> None:
        config = self.context.config
        reject_reduced_precision(config, "tensorflow_graph", PRECISION_HINT)
        prefix = self.context.artifact(config.model_file or DEFAULT_PREFIX)
        meta = prefix.with_name(prefix.name + ".meta")
        if not meta.is_file():
            raise InvalidArgument(f"model '{config.name}': meta graph {meta} not found")
        tf = self.tf = import_tensorflow()
        configure_device(tf, self.context.device)
        v1 = tf.compat.v1
        graph = tf.Graph()
        session_config = v1.ConfigProto(allow_soft_placement=True)
        session_config.gpu_options.allow_growth = True
        session = v1.Session(graph=graph, config=session_config)
        try:
            with graph.as_default():
                saver = v1.train.import_meta_graph(str(meta), clear_devices=True)
                if saver is not None:  # a graph without variables has nothing to restore
                    saver.restore(session, str(prefix))
            self._bind(graph)
        except InvalidArgument:
            session.close()
            raise
        except Exception as error:  # corrupt files, missing variables: one line, not a traceback
            session.close()
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise InvalidArgument(
                f"model '{config.name}': cannot restore checkpoint {prefix}: {type(error).__name__}: {first}"
            ) from None
        graph.finalize()  # nothing may add ops while serving
        self.session = session

    def _bind(self, graph: Any) -> None:
        """Resolve every configured tensor name now, so a typo is a load error."""
        config = self.context.config
        params = self.context.parameters
        input_names = _mapping(params, "input_tensors", config.name)
        output_names = _mapping(params, "output_tensors", config.name)
        for kind, known in (("input_tensors", config.inputs), ("output_tensors", config.outputs)):
            extra = sorted(set(_mapping(params, kind, config.name)) - {spec.name for spec in known})
            if extra:
                raise InvalidArgument(
                    f"model '{config.name}': parameters.{kind} names unknown tensors {extra}"
                )
        self.feeds = {}
        for spec in config.inputs:
            tensor = self._tensor(graph, input_names.get(spec.name, f"{spec.name}:0"), spec.name)
            check_shape(config, spec, _dims(tensor), f"input tensor {tensor.name} for")
            self.feeds[spec.name] = tensor
        self.fetches = []
        for spec in config.outputs:
            tensor = self._tensor(graph, output_names.get(spec.name, f"{spec.name}:0"), spec.name)
            check_shape(config, spec, _dims(tensor), f"output tensor {tensor.name} for")
            self.fetches.append(tensor)
        constants = params.get("constant_feeds", {}) or {}
        if not isinstance(constants, dict):
            raise InvalidArgument(
                f"model '{config.name}': parameters.constant_feeds must be a mapping"
            )
        self.constants = {
            self._tensor(graph, name, name): np.asarray(value) for name, value in constants.items()
        }

    def _tensor(self, graph: Any, tensor_name: str, for_name: str) -> Any:
        try:
            return graph.get_tensor_by_name(str(tensor_name))
        except (KeyError, ValueError) as error:
            raise InvalidArgument(
                f"model '{self.context.config.name}': '{for_name}' maps to tensor '{tensor_name}', "
                f"which the graph lacks ({str(error).splitlines()[0]})"
            ) from None

    def predict(
        self, inputs: dict[str, np.ndarray], outputs: frozenset[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:  # TF computes every fetched output: `outputs` is not used
        feed = dict(self.constants)
        for spec in self.context.config.inputs:
            # an optional input left out falls back to its placeholder's default
            if spec.name in inputs:
                array = inputs[spec.name]
                if spec.datatype == "BF16":  # raw bfloat16 words: widen before any numeric cast
                    array = bf16_words_to_float32(array)
                tensor = self.feeds[spec.name]
                feed[tensor] = _as_dtype(array, tensor.dtype)
        results = self.session.run(self.fetches, feed_dict=feed)
        return {
            spec.name: to_numpy(value)
            for spec, value in zip(self.context.config.outputs, results, strict=True)
        }

    def unload(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def device_memory(self) -> tuple[int, int]:
        return device_memory(self.tf, self.context.device) if self.tf else (0, 0)


def _mapping(params: dict[str, Any], key: str, model: str) -> dict[str, str]:
    value = params.get(key, {}) or {}
    if not isinstance(value, dict):
        raise InvalidArgument(
            f"model '{model}': parameters.{key} must map config names to tensor names"
        )
    return {str(k): str(v) for k, v in value.items()}


def _dims(tensor: Any) -> list[int | None] | None:
    shape = tensor.shape
    return None if shape.rank is None else list(shape.as_list())


def _as_dtype(array: np.ndarray, dtype: Any) -> np.ndarray:
    """Cast to the placeholder's dtype; strings pass through as object arrays of bytes."""
    if dtype.name == "string":
        return array
    target = dtype.as_numpy_dtype
    return array if array.dtype == target else array.astype(target)
