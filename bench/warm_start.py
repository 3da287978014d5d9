"""Seconds from submitting a job on a warm fleet to its first result (first chunk committed).

The fleet (--servers servers of the example protein embedder, built here at the given shape)
starts once and runs a first job, so models are loaded and warm. Then each repeat submits a
fresh small job, `tensorfleet run JOB --servers A,B` as a subprocess, and reads from the job's
manifest.sqlite when its first lease was taken and its first chunk committed (durable part
file plus manifest row). Times are wall-clock (time.time()) from just before the process is
spawned.

Reference in the same run: how long `python -m tensorfleet.coordinator --help` takes (the
interpreter and CLI start-up every submission pays).

    python -m bench.warm_start
    python -m bench.warm_start --device cuda --layers 33 --dim 1280 --heads 20 --precision bf16
"""

from __future__ import annotations

import argparse
import datetime
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import DEMO_FASTA, build_protein_repository, emit, machine
from bench.fleet import fleet, run_measured, tensorfleet_command, write_job

MODEL = "protein_embedder"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N (cuda: one per server)"
    )
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--rows", type=int, default=32, help="rows per job (--limit)")
    parser.add_argument("--chunk-rows", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fasta", type=Path, default=DEMO_FASTA)
    parser.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.dim, args.heads, args.rows, args.repeats, args.servers = (
            1,
            64,
            4,
            32,
            1,
            1,
        )
    return args


def manifest_times(job_dir: Path) -> tuple[float, float]:
    """(first lease, first commit) wall-clock times."""
    db = sqlite3.connect(f"file:{job_dir / 'manifest.sqlite'}?mode=ro", uri=True)
    try:
        lease = db.execute("SELECT MIN(at) FROM leases").fetchone()[0]
        commit = db.execute("SELECT MIN(committed_at) FROM chunks WHERE done = 1").fetchone()[0]
    finally:
        db.close()
    return lease, commit


def submit(args: argparse.Namespace, addresses: list[str], workdir: Path, name: str) -> dict:
    output = workdir / f"{name}.h5"
    job = write_job(
        workdir / f"{name}.yaml",
        {
            "name": name,
            "input": {"path": str(args.fasta)},
            "model": {"name": MODEL, "servers": addresses},
            "output": {"path": str(output), "tensors": {"embedding": "embedding"}},
            "chunking": {"batch_rows": args.batch, "chunk_rows": args.chunk_rows},
        },
    )
    submitted = time.time()
    result = run_measured(
        tensorfleet_command("run", str(job), "--limit", str(args.rows)), timeout=600
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"tensorfleet run exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    lease, commit = manifest_times(workdir / f"{name}.limit{args.rows}.h5.tfjob")
    return {
        "first_lease_s": round(lease - submitted, 3),
        "first_result_s": round(commit - submitted, 3),
        "job_wall_s": round(result.wall_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli_start = min(
        run_measured(tensorfleet_command("--help")).wall_s for _ in range(1 if args.quick else 3)
    )
    with tempfile.TemporaryDirectory(prefix="tf-bench-warm-") as tmp:
        workdir = Path(tmp)
        repository = build_protein_repository(
            workdir / "models", args.layers, args.dim, args.heads, args.precision
        )
        device_args = ["--device", args.device]  # cuda: every server on the same device
        with fleet(
            repository, args.servers, "--model", MODEL, *device_args, threads=args.threads
        ) as servers:
            addresses = [server.address for server in servers]
            first_job = submit(args, addresses, workdir, "first")
            runs = [submit(args, addresses, workdir, f"second-{i}") for i in range(args.repeats)]
    results = [run["first_result_s"] for run in runs]
    emit(
        {
            "bench": "warm_start",
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "device": args.device,
            "shape": f"{args.layers}x{args.dim} ({args.heads} heads)",
            "servers": args.servers,
            "rows": args.rows,
            "chunk_rows": args.chunk_rows,
            "batch_rows": args.batch,
            "cli_help_s": round(cli_start, 3),
            "first_job": first_job,
            "runs": runs,
            "first_result_s_median": round(statistics.median(results), 3),
            "first_result_s_min": round(min(results), 3),
            "target_s": 1.0,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
