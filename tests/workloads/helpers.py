"""Shared pieces of the workload tests: run `tensorfleet` for real and write job files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_tensorfleet(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "tensorfleet.coordinator", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_ROOT,
    )


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
