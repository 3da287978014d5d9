"""Fit the input to the model before anything is planned: duplicate ids, over-length rows, gene alignment.

Each step wraps the reader in a view (readers/views.py) and says what it did, for the run's
summary and the output's provenance. A gene list the input covers too little of is fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..fleet.model_info import ModelInfo
from ..io.readers import Reader
from ..io.readers.views import Aligned, Deduplicated, Truncated
from ..spec import AlignSpec, JobSpec

_EXAMPLES = 10


class AlignmentError(Exception):
    """The input covers too few of the model's features (below input.align.min_coverage)."""


@dataclass
class InputReport:
    """What the views did: lines for the summary, facts for the provenance."""

    lines: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


def _mapped_field(spec: JobSpec, reader: Reader, info: ModelInfo, model_input: str) -> str | None:
    if model_input in spec.input.tensors:
        return spec.input.tensors[model_input]
    required = [name for name in info.inputs if name not in info.optional_inputs]
    if not spec.input.tensors and required == [model_input] and reader.default_field:
        return reader.default_field
    return None


def align_columns(have: np.ndarray, want: list[str]) -> np.ndarray:
    """For each wanted name, its column in `have`, or -1. A name `have` repeats takes its first column."""
    position: dict[str, int] = {}
    for index, name in enumerate(have.tolist()):
        position.setdefault(str(name), index)
    return np.array([position.get(name, -1) for name in want], dtype=np.int64)


def _align(spec: JobSpec, reader: Reader, info: ModelInfo, report: InputReport) -> Reader:
    source = _mapped_field(spec, reader, info, info.features_input)
    if source is None or getattr(reader, "feature_names", None) is None:
        report.lines.append(
            f"features: model '{info.name}' declares {len(info.features)} features for input "
            f"'{info.features_input}'; this input has no feature names, so its columns are fed as they are"
        )
        return reader
    return align_field(spec.input.align, reader, source, info, report)


def align_field(align: AlignSpec, reader: Reader, source: str, info: ModelInfo, report: InputReport, label: str = "") -> Reader:
    """`reader` with field `source`'s columns matched by name to the model's feature list;
    AlignmentError below `align.min_coverage`. `label` names the file in messages (a prompt)."""
    have = reader.feature_names(source, align.var_column)
    if have is None:
        report.lines.append(f"features: {label}field '{source}' has no feature names; its columns are fed as they are")
        return reader
    columns = align_columns(have, info.features)
    found = int((columns >= 0).sum())
    coverage = found / len(info.features)
    missing = [name for name, column in zip(info.features, columns, strict=True) if column < 0]
    extra = len(set(map(str, have.tolist())) - set(info.features))
    where = f"var column '{align.var_column}'" if align.var_column else "var_names"
    prefix = "prompt_" if label else ""
    facts = {
        f"{prefix}alignment_field": source, f"{prefix}alignment_names": where,
        f"{prefix}alignment_model_features": len(info.features), f"{prefix}alignment_found": found,
        f"{prefix}alignment_missing": len(missing), f"{prefix}alignment_dropped": extra,
        f"{prefix}alignment_coverage": round(coverage, 6), f"{prefix}alignment_fill_value": align.fill_value,
    }
    if coverage < align.min_coverage:
        raise AlignmentError(
            f"{label}the input's genes ({where} of '{source}') cover {found} of model '{info.name}''s {len(info.features)} "
            f"features ({coverage:.1%}), below input.align.min_coverage {align.min_coverage:g}: "
            f"{len(missing)} missing, e.g. {', '.join(missing[:_EXAMPLES])}. Check the gene naming "
            "(symbols vs Ensembl ids: input.align.var_column) or lower input.align.min_coverage"
        )
    report.facts.update(facts)
    report.lines.append(
        f"{label}aligned: {found}/{len(info.features)} model features found in {where} ({coverage:.1%}); "
        f"{len(missing)} missing filled with {align.fill_value:g}"
        + (f" (e.g. {', '.join(missing[:3])})" if missing else "")
        + f"; {extra} input genes not in the model dropped"
    )
    return Aligned(reader, source, columns, align.fill_value)


def has_feature_axis(info: ModelInfo, model_input: str) -> bool:
    """Whether the model's feature list describes `model_input`'s columns: the input it was
    declared for, or another input of the same width (STACK's prompt beside its query)."""
    if not info.features or model_input not in info.inputs:
        return False
    if model_input == info.features_input:
        return True
    shape = info.inputs[model_input][1]
    return info.inputs[model_input][0] != "BYTES" and len(shape) >= 1 and shape[-1] == len(info.features)


def adapt_input(spec: JobSpec, reader: Reader, info: ModelInfo) -> tuple[Reader, InputReport]:
    """The reader the job plans and reads from, and what was done to get it."""
    report = InputReport()
    if spec.input.duplicate_ids != "error":
        deduplicated = Deduplicated(reader, spec.input.duplicate_ids)
        report.facts["duplicate_ids"] = deduplicated.repeated
        if deduplicated.repeated:
            report.lines.append(deduplicated.describe())
            reader = deduplicated
    for model_input, limit in sorted(info.max_lengths.items()):
        source = _mapped_field(spec, reader, info, model_input)
        if source is None or source not in reader.fields() or not reader.fields()[source].is_bytes:
            continue
        truncated = Truncated(reader, source, limit, spec.input.over_length)
        report.facts[f"over_length.{model_input}"] = truncated.over
        report.facts["over_length_policy"] = spec.input.over_length
        if truncated.over:
            report.lines.append(truncated.describe())
        reader = truncated
    if info.features:
        reader = _align(spec, reader, info, report)
    return reader, report
