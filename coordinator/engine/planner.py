"""Deterministic plans: the same input and chunking always give the same requests and chunks.

A chunk is a run of input rows checkpointed together in one part file; a request is a set
of a chunk's rows the server computes as one batch on its own. Both depend only on the input
and the job's chunking settings, never on the servers or on timing.

Under a token budget a chunk's rows are sent sorted by length (stable), so each request
holds rows of similar length and pads little: on the bundled proteins, 1.8x fewer padded
tokens than requests cut in input order. Part files still hold rows in input order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tensorfleet.core.hashing import file_sha256_once

from ..io.encoded_strings import EncodedStrings
from ..io.readers import Reader
from ..spec.input_files import as_list

_ID_BLOCK = 65536


class PlanError(Exception):
    """The input cannot be planned as asked (e.g. duplicate ids): a fatal, fixable error."""


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop). Requests are position ranges [bounds[i], bounds[i+1]) in send order.

    Position p (start <= p < stop) stands for input row start + offsets[p - start], where
    `order` holds the offsets as little-endian uint32 (4 bytes a row: a plan over millions of
    rows stays small); empty means input order (position p is row p).
    """

    index: int
    start: int
    stop: int
    bounds: tuple[int, ...]
    order: bytes = b""

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def requests(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds[:-1], self.bounds[1:], strict=True))

    def rows_at(self, start: int, stop: int) -> slice | np.ndarray:
        """Input rows of positions [start, stop): a slice in input order, else an index array."""
        if not self.order:
            return slice(start, stop)
        return self.start + self.offsets()[start - self.start : stop - self.start].astype(np.int64)

    def row_of(self, position: int) -> int:
        return position if not self.order else self.start + int(self.offsets()[position - self.start])

    def offsets(self) -> np.ndarray:
        """Row offsets in send order (a read-only view of `order`)."""
        return np.frombuffer(self.order, dtype="<u4")

    def request_rows(self) -> list[np.ndarray]:
        """Each request's input rows, in send order (what an in-process loop must batch alike)."""
        if not self.order:
            return [np.arange(a, b) for a, b in self.requests()]
        return [self.rows_at(a, b) for a, b in self.requests()]


@dataclass(frozen=True)
class InputFingerprint:
    path: str
    size: int
    sha256: str


class IdsDigest:
    """The digest of a run's ids, in order: the plan scans it from the input and the merge from the
    parts, and they must agree byte for byte, so both use this one definition (blake2b-128 over
    each id as its UTF-8 length, 4 bytes little-endian, then its bytes)."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)

    def add(self, value: str) -> bytes:
        """Add one id; its UTF-8 bytes."""
        encoded = value.encode()
        self._hash.update(len(encoded).to_bytes(4, "little") + encoded)
        return encoded

    def add_many(self, values: Iterable[str]) -> None:
        """Add ids in order: the same digest as `add` on each, in one hash update (a plan or a
        merge of millions of rows hashes in blocks, not one call per id)."""
        self.add_encoded(EncodedStrings.encode(list(values)))

    def add_encoded(self, ids: EncodedStrings) -> None:
        """Add ids given as their UTF-8 bytes and offsets (a part file's ids, never decoded): the
        length prefixes and the bytes are laid out side by side with numpy, one hash update."""
        if not len(ids):
            return
        lengths = ids.lengths()
        body = np.frombuffer(ids.data, dtype=np.uint8)
        out = np.empty(4 * len(lengths) + len(body), dtype=np.uint8)
        prefix_at = ids.offsets[:-1] + 4 * np.arange(len(lengths), dtype=np.int64)
        is_prefix = np.zeros(len(out), dtype=bool)
        is_prefix[(prefix_at[:, None] + np.arange(4)).reshape(-1)] = True
        out[is_prefix] = lengths.astype("<u4").view(np.uint8)
        out[~is_prefix] = body
        self._hash.update(out)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@dataclass(frozen=True)
class PlanSettings:
    """What a run is planned with; the same for a fresh run and its resume (plan_phase.plan_settings).

    A resume may reuse committed chunks only when these match what the manifest recorded."""

    rows: int
    batch_rows: int
    token_budget: int | None
    chunk_rows: int
    limit: int | None
    fields: dict[str, str]
    #: The job's model.parameters: they change the results, so a resume must keep them.
    parameters: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The settings as the manifest stores them (beside the plan's ids digest)."""
        extra = {"model_parameters": dict(sorted(self.parameters.items()))} if self.parameters else {}
        return {
            **extra,
            "rows": self.rows,
            "batch_rows": self.batch_rows,
            "token_budget": self.token_budget,
            "chunk_rows": self.chunk_rows,
            "limit": self.limit,
            "fields": dict(sorted(self.fields.items())),
            "request_order": "length-sorted within chunks" if self.token_budget else "input",
        }


#: What the manifest's plan record holds beyond PlanSettings: made by planning, not asked for.
PLAN_PRODUCTS = frozenset({"ids_digest"})


@dataclass(frozen=True)
class Plan:
    """A run's settings and what planning made of them: the ids digest, the inputs' fingerprints
    and the chunks."""

    settings: PlanSettings
    ids_digest: str
    inputs: list[InputFingerprint]
    chunks: list[Chunk] = field(default_factory=list)

    def record(self) -> dict:
        """What the manifest records: the settings, and the ids digest (the merge checks it)."""
        return {**self.settings.as_dict(), "ids_digest": self.ids_digest}

    def describe(self) -> str:
        requests = sum(len(chunk.bounds) - 1 for chunk in self.chunks)
        settings = self.settings
        lines = [
            f"rows: {settings.rows}" + (f" (limited to the first {settings.limit})" if settings.limit else ""),
            f"requests: {requests} (at most {settings.batch_rows} rows"
            + (f", {settings.token_budget} tokens" if settings.token_budget else "") + " each)",
            f"chunks: {chunk_sizes(self.chunks, settings.chunk_rows)}",
            "fields: " + ", ".join(f"{k} <- {v}" for k, v in sorted(settings.fields.items())),
        ]
        lines += [f"input: {item.path} ({item.size} bytes, sha256 {item.sha256[:16]}...)" for item in self.inputs]
        return "\n".join(lines)


def chunk_sizes(chunks: list[Chunk], chunk_rows: int) -> str:
    """The chunks as they were cut, e.g. `3 (128 rows each, the last 44; one part file each)`.

    Chunks keep whole requests, so they are rarely chunk_rows long: 64-row chunks of 128-row
    requests are 128 rows each; the text says what the plan holds, not what was asked."""
    sizes = [chunk.rows for chunk in chunks]
    if not sizes:
        return "0"
    first, last = sizes[0], sizes[-1]
    if len(set(sizes)) == 1:
        text = f"{first} rows" + (" each" if len(sizes) > 1 else "")
    elif len(set(sizes[:-1])) == 1:
        text = f"{first} rows each, the last {last}"
    else:
        text = f"{min(sizes)} to {max(sizes)} rows, {sum(sizes) / len(sizes):.0f} on average"
    asked = "" if max(sizes) <= chunk_rows or len(sizes) == 1 else f"; chunk_rows {chunk_rows} rounded up to whole requests"
    return f"{len(sizes)} ({text}{asked}; one part file each)"


def fingerprint(path: Path | str) -> InputFingerprint:
    path = Path(path)
    return InputFingerprint(str(path), path.stat().st_size, file_sha256_once(path))


#: The 64-bit hash that finds candidate repeats: Python's own string hash (per process; a test
#: swaps in a weak one to make distinct ids collide on purpose).
_id_hash = hash


def scan_ids(reader: Reader, rows: int) -> str:
    """Digest of the ids in order; PlanError naming the repeats if any id occurs twice.

    Memory: 8 bytes a row (each id's 64-bit Python string hash, sorted in place; 80 MB at 10^7
    rows). The rows behind a repeated hash are found by a second scan in the same process (the
    hash is per process), run only when a hash repeats; ids that only share a hash are no repeat."""
    digest = IdsDigest()
    # Python's own string hash finds candidate repeats (8 bytes a row; a collision is told
    # apart from a repeat below, by the ids themselves)
    hashes = np.empty(rows, dtype=np.int64)
    for start in range(0, rows, _ID_BLOCK):
        stop = min(start + _ID_BLOCK, rows)
        ids = [str(value) for value in reader.ids(start, stop)]
        digest.add_many(ids)
        hashes[start:stop] = np.fromiter(map(_id_hash, ids), dtype=np.int64, count=stop - start)
    hashes.sort()
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    del hashes
    if len(repeated):
        _refuse_duplicates(reader, rows, repeated)
    return digest.hexdigest()


def _refuse_duplicates(reader: Reader, rows: int, repeated: np.ndarray) -> None:
    """PlanError naming the ids that occur twice, among the rows whose hash is in `repeated`
    (two ids that only share a hash are no repeat)."""
    rows_by_id: dict[str, list[int]] = {}
    for start in range(0, rows, _ID_BLOCK):
        stop = min(start + _ID_BLOCK, rows)
        ids = reader.ids(start, stop)
        hashes = np.fromiter((_id_hash(str(value)) for value in ids), dtype=np.int64, count=len(ids))
        for offset in np.nonzero(np.isin(hashes, repeated))[0]:
            rows_by_id.setdefault(str(ids[offset]), []).append(start + int(offset))
    duplicates = {key: value for key, value in rows_by_id.items() if len(value) > 1}
    if duplicates:
        shown = "; ".join(f"'{key}' at rows {value}{_places(reader, value)}" for key, value in list(duplicates.items())[:10])
        more = f" (and {len(duplicates) - 10} more)" if len(duplicates) > 10 else ""
        raise PlanError(
            f"{len(duplicates)} ids occur more than once in the input: {shown}{more}. "
            f"Ids must be unique; make them unique or set input.ids to another field"
        )


def _places(reader: Reader, rows: list[int]) -> str:
    """Where repeated rows sit when that says more than their row numbers (the files of a
    several-file input: ' (in a.fa record 3 ..., b.fa record 1 ...)')."""
    places = [reader.where(row) for row in rows]
    return "" if places == [f"row {row}" for row in rows] else f" (in {', '.join(places)})"


def request_bounds(
    rows: int, batch_rows: int, lengths: np.ndarray | None = None, token_budget: int | None = None
) -> list[int]:
    """Split points of requests: at most batch_rows rows and rows x longest <= token_budget."""
    if lengths is None or not token_budget:
        return list(range(0, rows, batch_rows)) + [rows] if rows else [0]
    bounds = [0]
    start, longest = 0, 0
    for row in range(rows):
        length = max(int(lengths[row]), 1)
        candidate = max(longest, length)
        count = row - start + 1
        if row > start and (count > batch_rows or candidate * count > token_budget):
            bounds.append(row)
            start, candidate = row, length
        longest = candidate
    bounds.append(rows)
    return bounds


def length_sorted_chunks(lengths: np.ndarray, batch_rows: int, token_budget: int, chunk_rows: int) -> list[Chunk]:
    """Chunks of chunk_rows input rows; inside each, rows sorted by length, then cut by budget."""
    chunks: list[Chunk] = []
    for start in range(0, len(lengths), chunk_rows):
        stop = min(start + chunk_rows, len(lengths))
        order = np.argsort(lengths[start:stop], kind="stable")
        bounds = request_bounds(stop - start, batch_rows, lengths[start:stop][order], token_budget)
        chunks.append(Chunk(len(chunks), start, stop, tuple(start + b for b in bounds), order.astype("<u4").tobytes()))
    return chunks


def make_chunks(bounds: list[int], chunk_rows: int) -> list[Chunk]:
    """Group consecutive requests into chunks of about chunk_rows rows (request edges kept)."""
    chunks: list[Chunk] = []
    group = [bounds[0]]
    for point in bounds[1:]:
        group.append(point)
        if point - group[0] >= chunk_rows:
            chunks.append(Chunk(len(chunks), group[0], point, tuple(group)))
            group = [point]
    if len(group) > 1:
        chunks.append(Chunk(len(chunks), group[0], group[-1], tuple(group)))
    return chunks


def make_plan(
    reader: Reader,
    fields: dict[str, str],
    *,
    batch_rows: int,
    chunk_rows: int,
    token_budget: int | None = None,
    limit: int | None = None,
    input_paths: list[str] | None = None,
    parameters: dict | None = None,
) -> Plan:
    """Scan ids and (for token budgets) lengths, and cut the rows into requests and chunks."""
    rows = reader.num_rows if limit is None else min(limit, reader.num_rows)
    settings = PlanSettings(rows, batch_rows, token_budget, chunk_rows, limit, dict(fields), dict(parameters or {}))
    return plan_with(reader, settings, input_paths)


def plan_with(reader: Reader, settings: PlanSettings, input_paths: list[str] | None = None) -> Plan:
    """The plan of `settings` over the reader's first settings.rows rows."""
    rows, batch_rows, token_budget = settings.rows, settings.batch_rows, settings.token_budget
    ids_digest = scan_ids(reader, rows)
    lengths = None
    if token_budget:
        names = settings.fields.values()
        token_fields = [name for name in names if reader.fields()[name].is_bytes] or list(names)
        lengths = np.zeros(rows, dtype=np.int64)
        for name in token_fields:
            for start in range(0, rows, _ID_BLOCK):
                stop = min(start + _ID_BLOCK, rows)
                np.maximum(lengths[start:stop], reader.lengths(name, start, stop), out=lengths[start:stop])
    if lengths is not None and token_budget and rows:
        chunks = length_sorted_chunks(lengths, batch_rows, token_budget, settings.chunk_rows)
    else:
        chunks = make_chunks(request_bounds(rows, batch_rows), settings.chunk_rows) if rows else []
    return Plan(
        settings=settings,
        ids_digest=ids_digest,
        inputs=[fingerprint(path) for path in (input_paths or as_list(reader.spec.path))],
        chunks=chunks,
    )
