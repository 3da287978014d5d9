"""Job files beyond one model over one input: `stages:` (a pipeline), `models:` + `sources:` (a
sweep) or `prompt:` (an in-context job).

`tensorfleet run` reads the file once here; a plain job file goes on to the ordinary run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import ValidationError

from .spec import SpecError, format_validation_error


def load_workflow(path: Path | str) -> Callable | None:
    """A runner `(options) -> RunResult` for a pipeline or sweep job file; None for a plain job."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    if not isinstance(raw, dict) or not ({"stages", "models", "prompt"} & set(raw)):
        return None
    from .job import JobFatal

    base = path.resolve().parent
    try:
        if "stages" in raw:
            from .pipeline import PipelineSpec, run_pipeline

            spec = PipelineSpec.model_validate(raw).resolved(base)
            return lambda options: run_pipeline(spec, options)
        if "prompt" in raw:
            from .incontext import InContextSpec, run_incontext

            job = InContextSpec.model_validate(raw).resolved(base)
            return lambda options: run_incontext(job, options)
        from .sweep import SweepSpec, run_sweep

        sweep = SweepSpec.model_validate(raw).resolved(base)
        return lambda options: run_sweep(sweep, options)
    except ValidationError as error:
        raise JobFatal(format_validation_error(error, str(path))) from None
    except SpecError as error:
        raise JobFatal(str(error)) from None
