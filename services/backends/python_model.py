"""Backend `python`: a user's own `Model` class (load / predict on numpy arrays).

For models that bring their own preprocessing, e.g. BYTES protein strings tokenized
on the server. The class lives in the model folder (`python.module`, default model.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from tensorfleet.core.errors import InvalidArgument
from tensorfleet.core.sparse import as_csr

from .base import Backend, ModelContext


class PythonModelBackend(Backend):
    def __init__(self, context: ModelContext) -> None:
        super().__init__(context)
        self.model: object | None = None
        self.takes_outputs = False
        self.takes_parameters = False
        self.sparse_inputs = [spec.name for spec in context.config.inputs if spec.sparse]

    def load(self) -> None:
        spec_cfg = self.context.config.python
        path = self.context.artifact(spec_cfg.module)
        if not path.is_file():
            raise InvalidArgument(f"model '{self.context.config.name}': python module {path} not found")
        module_name = f"tensorfleet_user_model_{self.context.config.name}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        cls = getattr(module, spec_cfg.class_name, None)
        if cls is None:
            raise InvalidArgument(f"{path}: defines no class '{spec_cfg.class_name}'")
        model = cls()
        for method in ("load", "predict"):
            if not callable(getattr(model, method, None)):
                raise InvalidArgument(f"{path}: class {spec_cfg.class_name} has no {method}() method")
        model.load(self.context)
        self.model = model
        # a model whose predict takes `outputs` is told which outputs the batch needs
        accepted = inspect.signature(model.predict).parameters
        self.takes_outputs = "outputs" in accepted
        # a model whose predict takes `parameters` gets the request's parameters (a dict, maybe empty)
        self.takes_parameters = "parameters" in accepted

    def warmup(self) -> None:
        warm = getattr(self.model, "warmup", None)
        if callable(warm):
            warm()

    def predict(
        self, inputs: dict[str, np.ndarray], outputs: frozenset[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        extra: dict[str, Any] = {}
        if outputs is not None and self.takes_outputs:
            extra["outputs"] = outputs
        if self.takes_parameters:
            extra["parameters"] = dict(parameters or {})
        for name in self.sparse_inputs:  # `sparse: csr` inputs: a scipy.sparse.csr_matrix, always
            if name in inputs:
                inputs = {**inputs, name: as_csr(inputs[name])}
        return self.model.predict(inputs, **extra)  # type: ignore[union-attr]

    def can_stage(self) -> bool:
        """A model that copies ahead defines stage(inputs), predict_staged(staged) and
        can_stage() (True on its GPU): the batcher then copies the next batch during this one."""
        model = self.model
        probe = getattr(model, "can_stage", None)
        return (callable(probe) and callable(getattr(model, "stage", None))
                and callable(getattr(model, "predict_staged", None)) and bool(probe()))

    def stage(self, inputs: dict[str, np.ndarray]) -> Any:
        return self.model.stage(inputs)  # type: ignore[union-attr]

    def predict_staged(self, staged: Any, outputs: frozenset[str] | None = None) -> dict[str, np.ndarray]:
        run = self.model.predict_staged  # type: ignore[union-attr]
        if outputs is not None and "outputs" in inspect.signature(run).parameters:
            return run(staged, outputs=outputs)
        return run(staged)

    def last_stages(self) -> dict[str, int]:
        """A model may time its own copies: a `stage_ns` dict set by its predict (see
        docs/performance.md, "Reading the stage breakdown")."""
        stages = getattr(self.model, "stage_ns", None)
        return dict(stages) if isinstance(stages, dict) else {}

    def unload(self) -> None:
        release = getattr(self.model, "unload", None)
        if callable(release):
            release()
        self.model = None
