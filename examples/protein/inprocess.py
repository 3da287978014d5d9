"""Load a python-backend model folder in this process, the way the server's backend does.

The in-process side of the benchmarks and tests: same model class, same config, no gRPC.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from tensorfleet.services.backends.base import ModelContext
from tensorfleet.services.model_config import load_config


def load_python_model(
    model_dir: Path | str, device: str = "cpu", precision: str | None = None
) -> Any:
    """Import the folder's model.py, build its ModelContext, call load() and warmup()."""
    model_dir = Path(model_dir).resolve()
    config = load_config(model_dir)
    module_name = f"inprocess_model_{config.name}_{abs(hash(model_dir))}"
    spec = importlib.util.spec_from_file_location(module_name, model_dir / config.python.module)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    model = getattr(module, config.python.class_name)()
    context = ModelContext(
        model_dir=model_dir,
        config=config,
        device=device,
        precision=precision or config.precision,
        parameters=dict(config.parameters),
    )
    model.load(context)
    warm = getattr(model, "warmup", None)
    if callable(warm):
        warm()
    return model
