"""The models x sources job's one table (`output.layout: one_table`), for models of differing widths.

Models of one job rarely agree on widths: the epistasis example's embed_small gives 64 numbers
a row, embed_tiny 32. Each output keeps one column in the table; where the models' widths differ
that column is a variable-length list (`list<float>`), each row holding its own model's vector,
and where they agree it stays the fixed-size list each sheet has. One column per output (rather
than a column per model and output) keeps reading the table the same for every model:
`table.filter(model == m)` and `np.stack(column)`, with no per-model column names to know and no
nulls in the other models' rows. Differing numeric types are widened (float16 beside float32:
float32).

What can be checked before compute is: `check_stored_columns` compares the column names every
model's declared outputs give (models started locally: their config, no server), so a model whose
columns differ fails the job before any row is computed, not after. The table is written by row
groups, one part file's batch at a time, never all sheets in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..engine.job import JobFatal
from ..fleet.model_fleet import ModelFleet
from ..io.output_files import OutputFolder
from ..spec.kinds import SweepModelSpec, SweepSpec


def declared_columns(model: SweepModelSpec, outputs: dict[str, tuple[str, list[int]]]) -> list[str]:
    """The columns a model's runs store, from its declared outputs (as the merge names them)."""
    if model.outputs:
        unknown = sorted(set(model.outputs) - set(outputs))
        if unknown:
            raise JobFatal(f"model {model.name}: outputs names {unknown}, which the model does not return "
                           f"(it returns: {sorted(outputs)})")
        return list(model.outputs.values())
    return sorted(outputs)


def check_stored_columns(spec: SweepSpec, models: list[SweepModelSpec], job_dir: Path) -> None:
    """JobFatal, before any compute, when models started locally would store different columns
    (their config says; models on running servers are checked after their runs, as before)."""
    first: tuple[str, list[str]] | None = None
    for model in models:
        if model.local is None:
            continue
        info = ModelFleet(model, job_dir / model.name / "servers", spec.policy.server_wait_s).info()
        names = declared_columns(model, info.outputs)
        if first is None:
            first = (model.name, names)
        elif names != first[1]:
            raise JobFatal(
                f"model '{model.name}' gives the columns {names}, model '{first[0]}' {first[1]}; "
                f"map its outputs with models[].outputs so every sheet has the same columns"
            )


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind)


def _joined(name: str, kinds: list[pa.DataType]) -> pa.DataType:
    """A type every one of `kinds` casts to: lists of one fixed size stay fixed, lists of differing
    sizes become variable-length lists, numbers widen; anything else cannot share a column."""
    if all(kind == kinds[0] for kind in kinds):
        return kinds[0]
    if all(_is_list(kind) for kind in kinds):
        inner = _joined(name, [kind.value_type for kind in kinds])
        sizes = {kind.list_size if pa.types.is_fixed_size_list(kind) else None for kind in kinds}
        return pa.list_(inner, sizes.pop()) if len(sizes) == 1 and None not in sizes else pa.list_(inner)
    if all(pa.types.is_integer(kind) or pa.types.is_floating(kind) for kind in kinds):
        return pa.from_numpy_dtype(np.result_type(*(kind.to_pandas_dtype() for kind in kinds)))
    raise JobFatal(f"output.layout one_table: column '{name}' is {sorted({str(k) for k in kinds})} across the "
                   "models; map the outputs to different column names (models[].outputs) or use layout: per_model")


def unified_type(name: str, kinds: list[pa.DataType]) -> pa.DataType:
    """One arrow type that holds every model's `name` column."""
    return _joined(name, kinds)


def write_table(sheet: Path, keys: list[tuple[str, list[str]]], paths: list[Path]) -> None:
    """Every part file stacked under leading key columns (one value per file), each column of a type
    that holds every model's rows; atomic, written through the output folder held open."""
    schemas = [pq.read_schema(path) for path in paths]
    names = schemas[0].names
    for path, schema in zip(paths, schemas, strict=True):
        if schema.names != names:
            raise JobFatal(f"{path} has the columns {schema.names}, not {names}; map every model's outputs to the "
                           "same columns (models[].outputs)")
    fields = [pa.field(name, pa.string()) for name, _ in keys]
    fields += [pa.field(name, unified_type(name, [schema.field(name).type for schema in schemas])) for name in names]
    parts = []  # each (model, source) file's own provenance: models differ in build and parameters
    for index, schema in enumerate(schemas):
        parts.append({**{name: values[index] for name, values in keys},
                      **json.loads((schema.metadata or {}).get(b"tensorfleet", b"{}"))})
    metadata = dict(schemas[0].metadata or {})
    provenance = json.loads(metadata.get(b"tensorfleet", b"{}"))
    for name, values in keys:
        provenance[f"{name}s"] = list(dict.fromkeys(values))
    provenance["parts"] = parts
    metadata[b"tensorfleet"] = json.dumps(provenance, sort_keys=True).encode()
    plain = pa.schema(fields)
    with OutputFolder(sheet.parent) as folder:  # checked and held open; never replaces a file we did not write
        folder.check_replaceable(sheet.name)
        temp = folder.at(f".{sheet.name}.partial")
        with pq.ParquetWriter(temp, plain.with_metadata(metadata)) as writer:
            for index, path in enumerate(paths):
                for batch in pq.ParquetFile(path).iter_batches():
                    table = pa.Table.from_batches([batch]).replace_schema_metadata(None)
                    for position, (name, values) in enumerate(keys):
                        table = table.add_column(position, name, pa.array([values[index]] * table.num_rows, pa.string()))
                    writer.write_table(table.cast(plain))
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        folder.replace(temp.name, sheet.name)
