"""Shared helpers for the benchmarks: threads, data, a server subprocess, the JSON line.

Benchmarks never depend on pytest; the server launcher is the test harness's plain
module (`tests/serving.py`), which starts `python -m tensorfleet.services` and stops it by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.serving import ServerProcess, launch_server  # noqa: E402

DEMO_FASTA = REPO_ROOT / "examples" / "data" / "proteins.fasta"


def like_a_server_process(threads: int, device: str = "cpu") -> None:
    """Give the in-process baseline what a server process gets: the same torch intra-op
    threads (the server's --threads) and, on the CPU, the same allocator tuning
    (`services/allocator.py`), so the comparison measures serving, not a process setting."""
    import torch

    from tensorfleet.services.allocator import tune_allocator

    if device == "cpu":
        tune_allocator()
    torch.set_num_threads(threads)


def build_protein_repository(
    target: Path, layers: int, dim: int, heads: int, precision: str, per_residue: str | None = None
) -> Path:
    """Build the example protein embedder of this shape into `target` (a model repository).

    `per_residue` ("FP16" or "FP32"): serve each residue's state instead of the mean."""
    command = [
        sys.executable,
        str(REPO_ROOT / "examples" / "build_models.py"),
        "--out", str(target),
        "--layers", str(layers),
        "--dim", str(dim),
        "--heads", str(heads),
        "--precision", precision,
        *(["--per-residue", per_residue] if per_residue else []),
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=REPO_ROOT)
    return target


def protein_sequences(count: int, fasta: Path = DEMO_FASTA) -> list[bytes]:
    """The first `count` sequences of the FASTA, cycling through it if it holds fewer."""
    from examples.protein.fasta import read_fasta

    _, sequences = read_fasta(fasta)
    if not sequences:
        raise SystemExit(f"{fasta}: no sequences")
    return [sequences[i % len(sequences)] for i in range(count)]


@contextlib.contextmanager
def server_process(
    repository: Path, *args: str, threads: int, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """One server on loopback; always stopped by pid (SIGTERM, then SIGKILL) at the end.
    `env` is added to its environment."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(env or {})}
    server = launch_server(repository, *args, "--threads", str(threads), env=env, timeout=600)
    try:
        yield server
    finally:
        server.stop(signal.SIGTERM, timeout=15)


#: A server pass is slow when its busiest thread blocked more often than this per batch
#: (bench/server_passes.py says why: 1-5 is normal, the single malloc arena made 150-400).
SLOW_SWITCHES_PER_BATCH = 20.0


def thread_counters(pid: int) -> dict[int, tuple[int, int]]:
    """{thread id: (voluntary context switches, CPU clock ticks)} of every thread of `pid`."""
    counters = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            status = (task / "status").read_text()
            switches = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            counters[int(task.name)] = (switches, int(fields[11]) + int(fields[12]))  # utime + stime
    return counters


def busiest_switches(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> int:
    """The most voluntary context switches one thread made between two `thread_counters`."""
    return max((after[tid][0] - before.get(tid, (0, 0))[0] for tid in after), default=0)


class Stopwatch:
    """Accumulates wall time over several timed sections."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.laps: list[float] = []

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.laps.append(time.perf_counter() - started)
            self.seconds += self.laps[-1]


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cpus, {platform.system()}"


def stage_breakdown(model_stats: Any) -> dict[str, float]:
    """A server's ModelStatistics stage_stats as mean ms per count (per request for decode,
    queue and encode; per batch for the rest): where the served time went."""
    from tensorfleet.services.statistics import STAGES

    if model_stats is None:
        return {}
    stages = model_stats.stage_stats
    return {name: round(stages[name].ns / stages[name].count / 1e6, 3)
            for name in STAGES if name in stages and stages[name].count}


def emit(record: dict[str, Any]) -> None:
    """The benchmark's one result line on stdout."""
    print(json.dumps(record, sort_keys=False), flush=True)
