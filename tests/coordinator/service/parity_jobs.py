"""The four job kinds as the service parity tests submit them (issue 27 item 7): small inputs whose
last rows carry a marker, so a model server started with TF_TEST_WAIT_ON / TF_TEST_WAIT_FILE
holds the job running, mid-way, while the test looks at it (no sleeps, no timing)."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from pathlib import Path

import anndata
import numpy as np
import yaml

from tests.coordinator.helpers import ALPHABET, MODELS

PROMPTED = Path(__file__).parent / "models"
#: Sequences holding this wait while the wait file exists (the embed test model).
WAIT = "WAITWAIT"
CHUNK = {"chunk_rows": 16}
HELD_ROWS = 8  # the last rows of a held input carry the marker: its last chunk waits


def wait_env(wait_file: Path) -> dict[str, str]:
    return {"TF_TEST_WAIT_ON": WAIT, "TF_TEST_WAIT_FILE": str(wait_file)}


def fasta(path: Path, count: int, *, seed: int = 1, marked: set[int] = frozenset(), marker: str = WAIT) -> Path:
    """`count` records of 10-30 residues; `marked` rows hold `marker`."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for row in range(count):
            sequence = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(10, 30)))
            if row in marked:
                sequence = sequence[:4] + marker + sequence[4:]
            handle.write(f">seq{row}\n{sequence}\n")
    return path


def held(count: int) -> set[int]:
    return set(range(count - HELD_ROWS, count))


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def plain_job(folder: Path, server: str, rows: int = 96) -> Path:
    fasta(folder / "plain.fasta", rows, seed=2, marked=held(rows))
    return write(folder / "plain.yaml", {
        "name": "plain", "input": {"path": "plain.fasta"}, "model": {"name": "embed", "servers": [server]},
        "output": {"path": "plain.parquet"}, "chunking": {**CHUNK, "batch_rows": 8},
    })


def sweep_job(folder: Path, server: str, other: str, first: int = 32, second: int = 96) -> Path:
    """2 models x 2 sources: embed on `server` (a MODELS one), then lengths on `other` (a PROMPTED
    one). The second source's last chunk waits, so the second model is not planned yet while the
    job is held."""
    fasta(folder / "first.fasta", first, seed=3)
    fasta(folder / "second.fasta", second, seed=4, marked=held(second))
    return write(folder / "sweep.yaml", {
        "name": "sweep",
        "sources": [{"name": "first", "path": "first.fasta"}, {"name": "second", "path": "second.fasta"}],
        "models": [
            {"name": "embed", "servers": [server], "batch_rows": 8, "outputs": {"embedding": "value"}},
            {"name": "lengths", "servers": [other], "batch_rows": 8, "outputs": {"embedding": "value"}},
        ],
        "output": {"dir": "sheets"}, "chunking": CHUNK,
    })


def pipeline_job(folder: Path, server: str, rows: int = 96) -> Path:
    fasta(folder / "pipeline.fasta", rows, seed=5, marked=held(rows))
    return write(folder / "pipeline.yaml", {
        "name": "pipeline", "input": {"path": "pipeline.fasta"}, "output": {"path": "pipeline.parquet"},
        "stages": [
            {"name": "embed", "model": {"name": "embed", "servers": [server]}, "batch_rows": 8},
            {"name": "head", "model": {"name": "head16", "servers": [server]}, "tensors": {"x": "embedding"}},
        ],
        "chunking": CHUNK,
    })


def incontext_job(folder: Path, server: str, rows: int = 96) -> Path:
    """Query rows with a negative first value wait (the `prompted` test model): the last ones."""
    rng = np.random.default_rng(6)
    query = rng.random((rows, 4), dtype=np.float32)
    query[rows - HELD_ROWS:, 0] = -1.0
    names = [f"v{i}" for i in range(4)]
    anndata.AnnData(X=query, obs={"cell": [f"c{i}" for i in range(rows)]}, var={"gene": names}).write_h5ad(folder / "query.h5ad")
    prompt = rng.random((10, 4), dtype=np.float32)
    anndata.AnnData(X=prompt, var={"gene": names}).write_h5ad(folder / "prompt.h5ad")
    return write(folder / "incontext.yaml", {
        "name": "incontext", "input": {"path": "query.h5ad", "tensors": {"query": "X"}},
        "prompt": {"path": "prompt.h5ad", "tensors": {"prompt": "X"}},
        "model": {"name": "prompted", "servers": [server]}, "output": {"path": "incontext.h5ad"},
        "chunking": {**CHUNK, "batch_rows": 8},
    })


def committed(run_dir: Path) -> tuple[int, int]:
    """(rows of done chunks, rows planned) in one run folder's manifest, read here, not through the service."""
    path = run_dir / "manifest.sqlite"
    if not path.is_file():
        return 0, 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            done, total = db.execute(
                "SELECT COALESCE(SUM(CASE WHEN done THEN stop - start ELSE 0 END), 0), COALESCE(SUM(stop - start), 0)"
                " FROM chunks").fetchone()
    except sqlite3.OperationalError:  # the engine is creating it: no table yet
        return 0, 0
    return int(done), int(total)


def committed_total(run_dirs: list[Path]) -> int:
    return sum(committed(run_dir)[0] for run_dir in run_dirs)


__all__ = ["MODELS", "PROMPTED", "committed", "committed_total", "fasta", "incontext_job", "pipeline_job",
           "plain_job", "sweep_job", "wait_env", "write"]
