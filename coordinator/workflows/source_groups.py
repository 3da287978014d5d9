"""`sources[].group_by`: one table input split by a column into the sources of a models x sources job.

The epistasis pipeline keeps its mutants in one TSV with a `source` column (singles, doubles);
a sweep needs one source per value. `expand_groups` reads the column once and makes one source per
distinct value, in order of first appearance, labelled by the value (`<name>.<value>` when the
source has a name) and keeping only its rows (`group`); `grouped_reader` is the view of those rows a
run reads. Each (model, group) is an ordinary run; the input file's digest covers every group, so a
change to the file after a partial run is refused like any changed input.
"""

from __future__ import annotations

import re

import numpy as np
from pydantic import ValidationError

from ..engine.job import JobFatal, open_input
from ..io.readers import InputError, Reader
from ..io.readers.row_subset import RowSubset, group_rows
from ..spec import format_validation_error
from ..spec.kinds import NAME, SourceSpec, SweepSpec

#: More groups than this is a column of ids, not of sources.
MAX_GROUPS = 1000


def _groups(source: SourceSpec, index: int) -> dict[str, np.ndarray]:
    column = source.group_by or ""
    with open_input(source) as reader:
        if column not in reader.fields():
            raise JobFatal(f"sources[{index}].group_by: {source.path} has no column '{column}' "
                           f"(has: {sorted(reader.fields())})")
        try:
            groups = group_rows(reader, column)
        except InputError as error:
            raise JobFatal(str(error)) from None
    if len(groups) > MAX_GROUPS:
        raise JobFatal(f"sources[{index}].group_by '{column}' has {len(groups)} distinct values in {source.path}; "
                       f"a source column holds at most {MAX_GROUPS} (is it a column of ids?)")
    return groups


def expand_groups(spec: SweepSpec) -> SweepSpec:
    """The job with every `group_by` source (without `group`) replaced by one source per value; a
    `group` named by hand is checked to be in its column. Before any folder or server exists."""
    if not any(s.group_by for s in spec.sources):
        return spec
    sources: list[dict] = []
    for index, source in enumerate(spec.sources):
        if source.group_by and source.group is not None and source.group not in _groups(source, index):
            raise JobFatal(f"sources[{index}].group: no row of {source.path} holds '{source.group}' in "
                           f"'{source.group_by}'")
        if not source.group_by or source.group is not None:
            sources.append(source.model_dump())
            continue
        for value in _groups(source, index):
            label = f"{source.name}.{value}" if source.name else value
            if not re.match(NAME, label) or label in (".", ".."):
                raise JobFatal(f"sources[{index}].group_by '{source.group_by}': the value '{value}' cannot label a "
                               "source (letters, digits, '_', '.', '-'); clean the column or use another one")
            sources.append({**source.model_dump(), "name": label, "group": value})
    try:
        return SweepSpec.model_validate({**spec.model_dump(), "sources": sources})
    except ValidationError as error:  # a model's sources naming a value the column does not hold, two equal labels
        raise JobFatal(format_validation_error(error, "sources split by group_by")) from None


def grouped_reader(reader: Reader, source: SourceSpec) -> Reader:
    """`reader` (the source's whole table), or the view of the rows of its group."""
    if not source.group_by or source.group is None:
        return reader
    if source.group_by not in reader.fields():
        raise JobFatal(f"source {source.label}: {source.path} has no column '{source.group_by}'")
    rows = group_rows(reader, source.group_by).get(source.group)
    if rows is None:
        raise JobFatal(f"source {source.label}: no row of {source.path} holds '{source.group}' in "
                       f"'{source.group_by}'")
    return RowSubset(reader, rows)
