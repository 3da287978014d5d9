"""Coordinator read cost per row: a length-sorted chunk over an unsorted FASTA vs the same file sorted.

Under a token budget the coordinator sends each chunk's rows sorted by length, so a request
picks rows from all over the chunk. This bench builds every request of such a plan the way
the dispatcher does (`RequestSource.request`: read, slice, encode) for two FASTA files holding
the same sequences: in data order (lengths shuffled) and sorted by length within each chunk's
rows (so both files give the same chunks and the same requests, and each request's rows lie
side by side in the sorted one). It prints the coordinator CPU seconds per row for each
(process CPU, this thread alone does the work) and `ratio` = sorted / unsorted: 1.0 means a
request costs its own rows whatever the order; the goal is >= 0.95.

    python -m bench.span_reads                     # 20,000 sequences, median 300 residues
    python -m bench.span_reads --sequences 50000 --rounds 5
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import emit, machine
from tensorfleet.coordinator.engine.planner import make_plan
from tensorfleet.coordinator.engine.source import RequestSource
from tensorfleet.coordinator.io.readers import open_reader
from tensorfleet.coordinator.spec import InputSpec

_RESIDUES = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)


def write_fasta(path: Path, sequences: list[bytes], order: np.ndarray) -> None:
    with open(path, "wb") as handle:
        for index in order:
            sequence = sequences[index]
            handle.write(b">seq%d\n" % index)
            for at in range(0, len(sequence), 60):
                handle.write(sequence[at : at + 60] + b"\n")


def build_all(path: Path, args: argparse.Namespace) -> tuple[float, int]:
    """CPU seconds to build every request of the plan, and the rows they hold."""
    reader = open_reader(InputSpec(path=str(path), format="fasta"))
    try:
        plan = make_plan(reader, {"seq": "sequence"}, batch_rows=args.batch, chunk_rows=args.chunk_rows,
                         token_budget=args.token_budget)
        source = RequestSource(reader, {"seq": "sequence"}, {"seq": "BYTES"}, "m")
        spans = "span" in inspect.signature(source.request).parameters  # older sources read by span only
        rows = 0
        started = time.process_time()
        for chunk in plan.chunks:
            source.ids(chunk.start, chunk.stop)  # as the dispatcher does at lease
            for start, stop in chunk.requests():
                picked = chunk.rows_at(start, stop)
                if spans:
                    source.request(f"{chunk.index}:{start}", picked, (chunk.start, chunk.stop))
                else:
                    source.request(f"{chunk.index}:{start}", picked)
                rows += stop - start
            if hasattr(source, "release"):
                source.release(chunk.start, chunk.stop)
        return time.process_time() - started, rows
    finally:
        reader.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=20_000)
    parser.add_argument("--median", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=16_384)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(args.median), 0.5, args.sequences).astype(int), 10, 4000)
    sequences = [_RESIDUES[rng.integers(0, 20, n)].tobytes() for n in lengths]
    with tempfile.TemporaryDirectory(prefix="tf-span-") as folder:
        unsorted, ordered = Path(folder) / "unsorted.fasta", Path(folder) / "sorted.fasta"
        write_fasta(unsorted, sequences, np.arange(args.sequences))
        # Sorted within each chunk's rows (as the planner sorts them): the same chunks and the same
        # requests as the unsorted file, each request's rows now side by side in the file.
        within = [start + np.argsort(lengths[start : start + args.chunk_rows], kind="stable")
                  for start in range(0, args.sequences, args.chunk_rows)]
        write_fasta(ordered, sequences, np.concatenate(within))
        results: dict[str, list[float]] = {"unsorted": [], "sorted": []}
        build_all(unsorted, args)  # warm-up: imports, page cache
        build_all(ordered, args)
        for _ in range(args.rounds):  # interleaved, so load drifts hit both alike
            for name, path in (("unsorted", unsorted), ("sorted", ordered)):
                seconds, rows = build_all(path, args)
                results[name].append(seconds / rows)
    unsorted_us = float(np.median(results["unsorted"])) * 1e6
    sorted_us = float(np.median(results["sorted"])) * 1e6
    emit({
        "bench": "span_reads",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load": os.getloadavg()[0],
        "sequences": args.sequences,
        "coordinator_cpu_us_per_row_unsorted": round(unsorted_us, 2),
        "coordinator_cpu_us_per_row_sorted": round(sorted_us, 2),
        "ratio": round(sorted_us / unsorted_us, 3),
        "rounds_unsorted_us": [round(v * 1e6, 2) for v in results["unsorted"]],
        "rounds_sorted_us": [round(v * 1e6, 2) for v in results["sorted"]],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
