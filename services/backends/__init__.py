"""Model backends, one file each, named in BACKENDS and imported the first time a model uses one.

So torch loads only for a torch model and TensorFlow only for a TensorFlow one. Adding a backend
is a new file with a Backend subclass and one line in BACKENDS; nothing else changes.
"""

from __future__ import annotations

import importlib

from tensorfleet.core.errors import FailedPrecondition, InvalidArgument
from tensorfleet.core.extras import EXTRAS, missing_module_message

from .base import Backend, ModelContext

#: config.yaml `backend:` -> "module:class" in this package.
BACKENDS: dict[str, str] = {
    "python": "python_model:PythonModelBackend",
    "tensorflow": "tf_savedmodel:SavedModelBackend",
    "tensorflow_graph": "tf_graph:GraphCheckpointBackend",
    "torch_export": "torch_export:TorchExportBackend",
    "torchscript": "torchscript:TorchScriptBackend",
    "transformers": "transformers_embed:TransformersBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The Backend subclass for a backend name, its module imported now; KeyError if unknown."""
    module, _, attribute = BACKENDS[name].partition(":")
    try:
        loaded = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in EXTRAS:
            raise
        raise FailedPrecondition(missing_module_message(error, f"the {name} backend")) from None
    return getattr(loaded, attribute)


def create_backend(context: ModelContext) -> Backend:
    """A new, not yet loaded backend for the model's configured backend."""
    name = context.config.backend
    if name not in BACKENDS:
        raise InvalidArgument(
            f"model '{context.config.name}': unknown backend '{name}'; known: {sorted(BACKENDS)}"
        )
    return backend_class(name)(context)
