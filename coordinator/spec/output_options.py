"""Checks of the output options a spec can judge alone (the model's part is engine/output_checks.py)."""

from __future__ import annotations


def check_keep_input(names: list[str], output_format: str | None) -> None:
    """output.keep_input: distinct names, and an output format with a place for per-row input fields."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"output.keep_input names {repeated} more than once")
    if output_format == "h5ad":
        raise ValueError("output.keep_input is for csv, tsv, parquet and hdf5 outputs; an .h5ad output keeps an "
                         ".h5ad input's obs whole (write csv/parquet to keep other inputs' columns)")
    empty = [name for name in names if not name]
    if empty:
        raise ValueError("output.keep_input: an empty field name")
