"""A minimal FASTA reader for the examples and benchmarks (ids and sequences as bytes)."""

from __future__ import annotations

from pathlib import Path


def read_fasta(path: Path | str) -> tuple[list[str], list[bytes]]:
    """(ids, sequences): the id is the header's first word; sequence lines are joined."""
    ids: list[str] = []
    sequences: list[bytes] = []
    parts: list[bytes] = []
    with open(path, "rb") as handle:
        for line in handle:
            line = line.strip()
            if line.startswith(b">"):
                if ids:
                    sequences.append(b"".join(parts))
                header = line[1:].split(maxsplit=1)
                ids.append(header[0].decode() if header else "")
                parts = []
            elif line:
                parts.append(line)
    if ids:
        sequences.append(b"".join(parts))
    return ids, sequences
