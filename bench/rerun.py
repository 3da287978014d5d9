"""What re-running a finished job costs, for each job kind (issue 29: a pipeline manager re-runs
the same command, and a finished job must be a quick exit 0 that starts no server).

Each kind's job (the coordinator tests' small models on local fleets, and the STACK example for
in-context) runs once to the end; then the same `tensorfleet run JOB` runs `--repeats` times.
Reference in the same run: `tensorfleet schema`, the CLI's own start-up (interpreter, imports),
which every command pays. The ratio is the re-run's median wall time over the reference's.
CPU seconds (user + sys of the child) are printed too: on a shared, loaded machine they say
more than wall time.

    python -m bench.rerun
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import emit, machine

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "coordinator" / "models"


def _fasta(path: Path, rows: int) -> None:
    import random

    rng = random.Random(1)
    with open(path, "w") as handle:
        for row in range(rows):
            handle.write(f">seq{row}\n{''.join(rng.choice('ACDEFGHIKLMNPQRSTVWY') for _ in range(rng.randint(5, 90)))}\n")


def _local(name: str) -> dict:
    return {"name": name, "local": {"repository": str(MODELS), "count": 1}}


def _jobs(root: Path) -> dict[str, Path]:
    _fasta(root / "in.fasta", 200)
    specs = {
        "plain": {"name": "plain", "input": {"path": str(root / "in.fasta")}, "model": _local("embed"),
                  "output": {"path": str(root / "plain.h5")}, "chunking": {"chunk_rows": 32}},
        "multi-stage": {"name": "two", "input": {"path": str(root / "in.fasta")}, "output": {"path": str(root / "two.parquet")},
                        "stages": [{"name": "embed", "model": _local("embed")},
                                   {"name": "head", "model": _local("head16"), "tensors": {"x": "embedding"}}],
                        "chunking": {"chunk_rows": 32}},
        "models x sources": {"name": "sweep", "sources": [{"name": "a", "path": str(root / "in.fasta")}],
                             "models": [_local("embed")], "output": {"dir": str(root / "sheets")},
                             "chunking": {"chunk_rows": 32}},
    }
    jobs = {}
    for kind, spec in specs.items():
        jobs[kind] = root / f"{kind.replace(' ', '-')}.yaml"
        jobs[kind].write_text(yaml.safe_dump(spec))
    shutil.copytree(ROOT / "examples" / "stack", root / "stack", ignore=shutil.ignore_patterns("output", "*.tfjob"))
    jobs["in-context"] = root / "stack" / "stack.yaml"
    return jobs


def _timed(args: list[str]) -> tuple[float, float, int]:
    """(wall seconds, child CPU seconds, exit code) of `tensorfleet ARGS`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tensorfleet.coordinator", *args], capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    record: dict = {"bench": "rerun", "date": datetime.date.today().isoformat(), "machine": machine(),
                    "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="tf-rerun-") as folder:
        jobs = _jobs(Path(folder))
        reference = [_timed(["schema"]) for _ in range(args.repeats)]
        record["reference_s"] = round(statistics.median(r[0] for r in reference), 3)
        for kind, job in jobs.items():
            first = _timed(["run", str(job)])
            if first[2] != 0:
                raise SystemExit(f"{kind}: the first run exited {first[2]}")
            again = [_timed(["run", str(job)]) for _ in range(args.repeats)]
            if any(code != 0 for _, _, code in again):
                raise SystemExit(f"{kind}: a re-run of the finished job did not exit 0")
            wall = statistics.median(r[0] for r in again)
            record[kind] = {"rerun_s": round(wall, 3), "rerun_cpu_s": round(statistics.median(r[1] for r in again), 3),
                            "first_run_s": round(first[0], 2), "ratio_vs_startup": round(wall / record["reference_s"], 2)}
    emit(record)


if __name__ == "__main__":
    main()
