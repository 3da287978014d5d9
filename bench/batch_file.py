"""Batches of sequences in a plain file, for a load generator in another process (no pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_batches(batches: list[np.ndarray], path: Path) -> None:
    """One sequence per line, a blank line after each batch (sequences hold no newline)."""
    path.write_bytes(b"".join(b"\n".join(batch.tolist()) + b"\n\n" for batch in batches))


def read_batches(path: Path) -> list[np.ndarray]:
    batches, current = [], []
    for line in path.read_bytes().split(b"\n"):
        if line:
            current.append(line)
        elif current:
            batches.append(np.array(current, dtype=object))
            current = []
    if current:
        batches.append(np.array(current, dtype=object))
    return batches
