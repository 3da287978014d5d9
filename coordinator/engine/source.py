"""Turn planned row ranges into inference requests: read the mapped fields, cast, encode.

Every request carries `tensorfleet.exclusive = true`, so the server runs its rows as one
batch on their own and the numbers never depend on what else was in flight.
"""

from __future__ import annotations

import numpy as np

from tensorfleet.client.messages import build_wire_request
from tensorfleet.core.codec import NUMPY_DTYPES
from tensorfleet.core.wire import InferRequest

from ..io.readers import FieldInfo, Reader

EXCLUSIVE = "tensorfleet.exclusive"
CONTEXT = "tensorfleet.context"
CONTEXT_PUT = "tensorfleet.context_put"


class RowsRejected(Exception):
    """Rows of a request the input itself makes unusable (FASTA stop codons, over-length under
    input.over_length: error): they fail alone, with these messages, and are never sent."""

    def __init__(self, errors: dict[int, str]) -> None:
        super().__init__(f"{len(errors)} rows rejected")
        #: offset within the request's rows -> why
        self.errors = errors


class FieldMappingError(Exception):
    """The job maps fields that do not fit the model's inputs; says what to change."""


def resolve_fields(
    mapping: dict[str, str], reader: Reader, model_inputs: dict[str, tuple[str, list[int]]], optional: set[str]
) -> dict[str, str]:
    """model input -> input field, checked against the model's inputs and the file's fields."""
    fields = reader.fields()
    if not mapping:
        required = [name for name in model_inputs if name not in optional]
        if len(required) != 1 or not reader.default_field:
            raise FieldMappingError(
                f"set input.tensors (model input -> field): the model takes {sorted(model_inputs)}, "
                f"the input offers {sorted(fields)}"
            )
        mapping = {required[0]: reader.default_field}
    for name, field in mapping.items():
        if name not in model_inputs:
            raise FieldMappingError(f"input.tensors: the model has no input '{name}' (it has {sorted(model_inputs)})")
        if field not in fields:
            raise FieldMappingError(f"input.tensors.{name}: the input has no field '{field}' (it has {sorted(fields)})")
        check_field(name, fields[field], *model_inputs[name])
    missing = [name for name in model_inputs if name not in mapping and name not in optional]
    if missing:
        raise FieldMappingError(f"input.tensors: the model's inputs {missing} are not mapped to any field")
    return dict(mapping)


def check_field(name: str, info: FieldInfo, datatype: str, shape: list[int]) -> None:
    if (datatype == "BYTES") != info.is_bytes:
        want = "strings (BYTES)" if datatype == "BYTES" else f"numbers ({datatype})"
        raise FieldMappingError(f"input.tensors.{name}: field '{info.name}' does not hold {want}")
    if datatype == "BF16":
        raise FieldMappingError(f"input '{name}' is BF16, which the coordinator cannot send yet")
    if datatype != "BYTES" and (
        len(shape) != len(info.row_shape)
        or any(want not in (-1, have) for want, have in zip(shape, info.row_shape, strict=False))
    ):
        raise FieldMappingError(
            f"input.tensors.{name}: field '{info.name}' rows have shape {list(info.row_shape)}, "
            f"the model wants {shape}"
        )


class RequestSource:
    """Reads rows for one model's requests. Called from one thread at a time."""

    def __init__(
        self, reader: Reader, fields: dict[str, str], datatypes: dict[str, str], model: str, version: str = ""
    ) -> None:
        self.reader = reader
        self.fields = fields
        self.datatypes = datatypes
        self.model = model
        self.version = version
        #: A stored context (prompt): (id, tensors), put once per stream, referenced by every request.
        self.context: tuple[str, dict[str, np.ndarray]] | None = None
        #: Outputs to ask for (the ones the job stores); None: every output the model has.
        self.outputs: list[str] | None = None
        #: The job's model.parameters: OIP request parameters on every request.
        self.parameters: dict[str, str | int | float | bool] = {}

    def inputs(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return self.inputs_at(slice(start, stop))

    def inputs_at(self, rows: slice | np.ndarray) -> dict[str, np.ndarray]:
        """The mapped fields of these rows: a range, or row indices (read as their span, then picked)."""
        if isinstance(rows, slice):
            start, stop, pick = rows.start, rows.stop, None
        else:
            start, stop = int(rows.min()), int(rows.max()) + 1
            pick = rows - start
        out = {}
        for name, field in self.fields.items():
            values = self.reader.read(field, start, stop)
            if pick is not None:
                values = values[pick]
            datatype = self.datatypes[name]
            if datatype != "BYTES":
                values = np.ascontiguousarray(values, dtype=NUMPY_DTYPES[datatype])
            out[name] = values
        return out

    def rejected(self, rows: slice | np.ndarray) -> dict[int, str]:
        """Offsets within `rows` of the rows the reader refuses, and why."""
        if isinstance(rows, slice):
            errors = self.reader.row_errors(rows.start, rows.stop)
            return {row - rows.start: message for row, message in errors.items()}
        errors = self.reader.row_errors(int(rows.min()), int(rows.max()) + 1)
        return {offset: errors[int(row)] for offset, row in enumerate(rows) if int(row) in errors}

    def describe_row(self, row: int, row_id: str) -> str:
        """Where a row is, for its error message: its position in the file and its id."""
        return f"{self.reader.where(row)}, id '{row_id}'"

    def request(self, request_id: str, rows: slice | np.ndarray) -> InferRequest:
        """The request for these rows; RowsRejected when the reader refuses some of them."""
        refused = self.rejected(rows)
        if refused:
            raise RowsRejected(refused)
        parameters: dict = {**self.parameters, EXCLUSIVE: True}
        if self.context is not None:
            parameters[CONTEXT] = self.context[0]
        return build_wire_request(
            self.model, self.inputs_at(rows), request_id=request_id, parameters=parameters,
            version=self.version, outputs=self.outputs,
        )

    def preamble(self) -> list[InferRequest]:
        """Requests every new stream sends first: the context put, when the job has a context."""
        if self.context is None:
            return []
        context_id, tensors = self.context
        return [build_wire_request(
            self.model, tensors, request_id=f"context:{context_id}", parameters={CONTEXT_PUT: context_id},
            version=self.version,
        )]

    def ids(self, start: int, stop: int) -> np.ndarray:
        return self.reader.ids(start, stop)
