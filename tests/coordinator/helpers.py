"""Shared pieces of the coordinator tests: data files, job files, and running `tensorfleet` for real."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

MODELS = Path(__file__).parent / "models"
REPO_ROOT = Path(__file__).resolve().parents[2]
ALPHABET = "ACDEFGHIKLMNPQRSTVWY"


def make_fasta(path: Path, count: int, *, seed: int = 1, poison: set[int] = frozenset(), duplicate: dict[int, int] | None = None) -> list[tuple[str, str]]:
    """Write `count` records (some wrapped over two lines); poison rows hold '!'."""
    rng = random.Random(seed)
    records = []
    with open(path, "w") as handle:
        for row in range(count):
            sequence = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(5, 90)))
            if row in poison:
                sequence = sequence[:3] + "!" + sequence[3:]
            name = f"seq{(duplicate or {}).get(row, row)}"
            records.append((name, sequence))
            body = "\n".join(sequence[i : i + 60] for i in range(0, len(sequence), 60))
            handle.write(f">{name} test record {row}\n{body}\n")
    return records


def write_job(path: Path, *, input: dict, model: dict, output: dict, **extra) -> Path:
    spec = {"name": "test", "input": input, "model": model, "output": output, **extra}
    path.write_text(yaml.safe_dump(spec))
    return path


def local_model(name: str, count: int = 1) -> dict:
    return {"name": name, "local": {"repository": str(MODELS), "count": count}}


def tensorfleet_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tensorfleet.coordinator", *map(str, args)]


def run_tensorfleet(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        tensorfleet_command(*args), capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO_ROOT
    )


def start_tensorfleet(*args: str, env: dict | None = None, log: Path) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "wb") as handle:
        return subprocess.Popen(tensorfleet_command(*args), stdout=handle, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT)


def chunks_done(job_dir: Path) -> int:
    """Committed chunks, read the way `tensorfleet status` does (0 before the manifest exists)."""
    path = job_dir / "manifest.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM chunks WHERE done = 1").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def wait_for(condition, *, timeout: float = 120, what: str = "condition") -> None:
    """Poll until `condition()` is true; fails the test (not a timing assertion) if it never is."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def committed_rows(job_dir: Path) -> set[int]:
    with sqlite3.connect(job_dir / "manifest.sqlite") as db:
        rows = db.execute("SELECT start, stop FROM chunks WHERE done = 1").fetchall()
    return {row for start, stop in rows for row in range(start, stop)}
