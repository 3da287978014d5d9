"""The job's output slots checked against the model's description before anything is computed.

Each check here stands for an error the merge (or the input view) would otherwise meet only
after every row was computed, or never at all: found by the plan instead, it exits 2 before any
server starts (a local fleet's model is read from its config.yaml; running servers are asked
once, before a row is sent), with a message that names the fix.

- An .h5ad output's `layers` hold only outputs as wide as the input's var (n_vars).
- An output whose rows differ in length (a -1 dimension) needs a ragged home: an HDF5 output
  with `output.ragged` naming the output that holds each row's length.
- `input.over_length: error` needs a model that declares `max_length` on the input it feeds;
  without one the policy would silently do nothing.
- `output.keep_input` names fields of the input that do not collide with a stored output.
"""

from __future__ import annotations

from pathlib import Path

from ..fleet.model_info import ModelInfo
from ..io.readers import Reader
from ..spec import JobSpec
from ..spec.errors import JobFatal

#: Columns every tabular output already has: a kept input column may not take their names.
RESERVED_COLUMNS = frozenset({"id", "ok", "error", "truncated"})


def check_output_slots(spec: JobSpec, reader: Reader, info: ModelInfo, *, reads_input: bool = True,
                       writes_output: bool = True) -> None:
    """JobFatal naming the fix for the first slot the model's outputs cannot fill.

    `reads_input`: this run reads the job's own input (not an earlier stage's outputs), so the
    input's policies apply; `writes_output`: this run's outputs go to the job's output file."""
    if reads_input:
        check_over_length(spec, reader, info)
    if writes_output:
        stored = stored_names(spec, info)
        check_ragged(spec, info, stored)
        check_layers(spec, info, stored)
        check_keep_input(spec, reader, stored)


def stored_names(spec: JobSpec, info: ModelInfo) -> dict[str, str]:
    """Model output -> stored name, for the outputs the job keeps that the model declares."""
    wanted = spec.output.tensors or {name: name for name in info.outputs}
    return {source: stored for source, stored in wanted.items() if source in info.outputs}


def _variable(shape: list[int]) -> bool:
    return any(int(dim) < 0 for dim in shape)


def check_ragged(spec: JobSpec, info: ModelInfo, stored: dict[str, str]) -> None:
    """A -1 output stored without output.ragged would be padded to each chunk's longest row and
    fail at the merge once two chunks differ; output.ragged's own names are checked here too."""
    for source, lengths in spec.output.ragged.items():
        known = sorted(info.outputs)
        if source not in info.outputs or lengths not in info.outputs:
            raise JobFatal(f"output.ragged maps '{source}' -> '{lengths}'; model '{info.name}' returns {known}: "
                           "map a variable-length output to the integer output holding each row's length")
        datatype, shape = info.outputs[lengths]
        if not datatype.startswith(("INT", "UINT")) or int(_width(shape)) != 1:
            raise JobFatal(f"output.ragged: '{lengths}' ({datatype} {shape}) must be one integer a row (the length "
                           f"of '{source}'); model '{info.name}' returns {_describe(info)}")
    for source in stored:
        datatype, shape = info.outputs[source]
        if not _variable(shape) or source in spec.output.ragged:
            continue
        lengths = _length_outputs(info)
        if spec.output.format == "hdf5":
            hint = (f"map it to its lengths output: output.ragged: {{{source}: {lengths[0]}}}" if lengths else
                    "map it in output.ragged to the output that holds each row's length")
        else:
            hint = (f"variable-length outputs are stored in HDF5 only (output.ragged); write an .h5 output"
                    f"{f' with output.ragged: {{{source}: {lengths[0]}}}' if lengths else ''}")
        raise JobFatal(
            f"model '{info.name}' output '{source}' has rows of different lengths ({datatype} {shape}) and the "
            f"job stores it with no ragged home: {hint}, or leave it out with output.tensors "
            f"(keep: {_fixed_outputs(info) or 'none'})"
        )


def _width(shape: list[int]) -> int:
    width = 1
    for dim in shape:
        width *= int(dim)
    return width


def _length_outputs(info: ModelInfo) -> list[str]:
    return [name for name, (datatype, shape) in info.outputs.items()
            if datatype.startswith(("INT", "UINT")) and not _variable(shape) and _width(shape) == 1]


def _fixed_outputs(info: ModelInfo) -> str:
    return ", ".join(name for name, (_, shape) in info.outputs.items() if not _variable(shape))


def _describe(info: ModelInfo) -> str:
    return ", ".join(f"{name} {datatype} {shape}" for name, (datatype, shape) in info.outputs.items())


def check_layers(spec: JobSpec, info: ModelInfo, stored: dict[str, str]) -> None:
    """.h5ad `layers` are [n_obs, n_vars]: an output of any other width fails the writer."""
    if spec.output.format != "h5ad" or spec.output.h5ad_slot != "layers":
        return
    if spec.input.format != "h5ad":
        raise JobFatal(
            f"output.h5ad_slot: layers holds [cells, genes] matrices of the input's genes, and input {spec.input.path} "
            f"is {spec.input.format}, not .h5ad (no genes): set output.h5ad_slot: obsm"
        )
    n_vars = h5ad_var_count(spec.input.path)
    wrong = {source: shape for source, (_, shape) in info.outputs.items()
             if source in stored and list(shape) != [n_vars]}
    if wrong:
        shown = ", ".join(f"'{source}' {shape}" for source, shape in wrong.items())
        fitting = [source for source in stored if source not in wrong]
        keep = f"keep only {fitting} with output.tensors, or " if fitting else ""
        raise JobFatal(
            f"output.h5ad_slot: layers takes outputs as wide as the input's {n_vars} genes (n_vars of "
            f"{spec.input.path}); model '{info.name}' returns {shown}: {keep}set output.h5ad_slot: obsm"
        )


def h5ad_var_count(path: str) -> int:
    """The number of genes (var rows) of an .h5ad file: the width its layers must have."""
    import h5py

    with h5py.File(Path(path), "r") as file:
        var = file.get("var")
        if isinstance(var, h5py.Dataset):  # anndata before 0.7: a compound dataset
            return len(var)
        if not isinstance(var, h5py.Group):
            return 0
        index = var.attrs.get("_index", "_index")
        index = index.decode() if isinstance(index, bytes) else str(index)
        return len(var[index]) if index in var else 0


def check_over_length(spec: JobSpec, reader: Reader, info: ModelInfo) -> None:
    """`over_length: error` applies only to inputs whose model declares max_length; a job asking
    for it where none is declared would send over-length rows to the model and never know."""
    if spec.input.over_length != "error":
        return
    fed_bytes = [name for name, (datatype, _) in info.inputs.items() if datatype == "BYTES"]
    if any(name in info.max_lengths for name in fed_bytes):
        return
    where = f" (its BYTES inputs: {fed_bytes})" if fed_bytes else " (it takes no BYTES input)"
    raise JobFatal(
        f"input.over_length: error has no effect: model '{info.name}' declares no max_length on an input{where}. "
        f"Declare it on the input in the model's config.yaml (inputs: - {{name: "
        f"{fed_bytes[0] if fed_bytes else 'sequence'}, datatype: BYTES, shape: [], max_length: N}}), or remove "
        "input.over_length"
    )


def check_keep_input(spec: JobSpec, reader: Reader, stored: dict[str, str]) -> None:
    """Kept input fields exist, and no kept field takes a stored output's or a fixed column's name."""
    keep = spec.output.keep_input
    if not keep:
        return
    fields = reader.fields()
    missing = [name for name in keep if name not in fields]
    if missing:
        raise JobFatal(f"output.keep_input names {missing}, which input {spec.input.path} does not have "
                       f"(it has: {sorted(fields)})")
    taken = sorted((set(keep) & set(stored.values())) | (set(keep) & RESERVED_COLUMNS))
    if taken:
        raise JobFatal(f"output.keep_input {taken}: the output already has columns of these names (outputs: "
                       f"{sorted(stored.values())}; and id, ok, error, truncated); rename the outputs with "
                       "output.tensors")
