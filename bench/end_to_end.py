"""FASTA to HDF5, end to end: a hand-written in-process loop vs `tensorfleet run`.

(a) in-process: read the FASTA, cut it into the same requests the coordinator plans (in
    windows of --chunk-rows rows, sorted by length, at most --batch rows and rows x longest
    <= --token-budget), run the model folder's own `Model.predict` on each, write ids and
    embeddings in input order to one HDF5 file;
(b) tensorfleet: `tensorfleet run JOB --servers ADDR` (a subprocess) against one warm server
    on the same device with the same torch threads: plan, dispatch, checkpoint, merge.

The two sides alternate for --rounds rounds (each tensorfleet round is a fresh job folder).
Times cover the whole loop / the whole command (its interpreter start-up included); the
model is loaded beforehand on both sides (the server is long-lived; the in-process model is
loaded once). `ratio` = in-process seconds / tensorfleet seconds (throughput ratio).
`ratio_dispatch` uses the coordinator's own dispatch time (its `speed:` line) instead,
leaving out start-up, planning and merge. The outputs are compared.

    python -m bench.end_to_end                        # CPU, 2 x 128, the 2,000 example proteins
    python -m bench.end_to_end --tiny                 # 2 x 64, 10,000 synthetic proteins (median 60):
                                                      # where the cost of each request shows
    python -m bench.end_to_end --device cuda --layers 33 --dim 1280 --heads 20 --precision bf16 \\
        --fasta big.fasta --threads 4
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (
    DEMO_FASTA,
    build_protein_repository,
    emit,
    like_a_server_process,
    machine,
    server_process,
)
from bench.fleet import run_measured, speed_line, tensorfleet_command, write_job

MODEL = "protein_embedder"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--fasta", type=Path, default=DEMO_FASTA)
    parser.add_argument(
        "--sequences", type=int, default=2000,
        help="first N sequences (tensorfleet --limit); default: the whole example FASTA, a job "
        "long enough that start-up is a start-up, not the measurement",
    )
    parser.add_argument("--batch", type=int, default=32, help="rows per request / predict call")
    parser.add_argument("--token-budget", type=int, default=8192, help="rows x longest per request")
    parser.add_argument("--chunk-rows", type=int, default=256, help="rows per chunk (as in the demo job)")
    parser.add_argument("--window", type=int, default=4, help="requests in flight (tensorfleet)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads, both sides (default: this machine's cores, as a user's server runs)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--median", type=float, default=0.0,
                        help="instead of --fasta: --sequences synthetic proteins with this median length")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model (2 x 64) on 10,000 short synthetic proteins (median 60)")
    parser.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.dim, args.heads, args.sequences, args.median = 2, 64, 4, 10_000, 60.0
        args.batch, args.token_budget, args.rounds = 64, 4096, 3
    if args.quick:
        args.layers, args.dim, args.heads, args.sequences, args.rounds = 1, 64, 4, 64, 1
    return args


def request_rows(lengths: list[int], batch: int, budget: int, window: int) -> list[np.ndarray]:
    """A careful hand-written loop's batches: per window of rows, sort by length, then take
    rows while at most `batch` and rows x longest <= `budget`."""
    requests = []
    for first in range(0, len(lengths), window):
        rows = first + np.argsort(np.asarray(lengths[first : first + window]), kind="stable")
        start, longest = 0, 0
        for index, row in enumerate(rows):
            candidate = max(longest, max(lengths[row], 1))
            if index > start and (index - start + 1 > batch or candidate * (index - start + 1) > budget):
                requests.append(rows[start:index])
                start, candidate = index, max(lengths[row], 1)
            longest = candidate
        requests.append(rows[start:])
    return requests


def run_inprocess(model, fasta: Path, count: int, args: argparse.Namespace, output: Path) -> float:
    import h5py

    from examples.protein.fasta import read_fasta

    started = time.perf_counter()
    ids, sequences = read_fasta(fasta)
    ids, sequences = ids[:count], sequences[:count]
    column = np.array(sequences, dtype=object)
    embedding = None
    for rows in request_rows([len(s) for s in sequences], args.batch, args.token_budget, args.chunk_rows):
        out = model.predict({"sequence": column[rows]})["embedding"]
        if embedding is None:
            embedding = np.empty((len(sequences), *out.shape[1:]), dtype=np.float32)
        embedding[rows] = out
    temp = output.with_name(output.name + ".tmp")
    with h5py.File(temp, "w") as handle:
        handle.create_dataset(
            "ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8")
        )
        handle.create_dataset("embedding", data=embedding, chunks=True)
    temp.rename(output)
    return time.perf_counter() - started


def run_served(
    address: str, args: argparse.Namespace, workdir: Path, name: str
) -> tuple[float, float, Path]:
    output = workdir / f"{name}.h5"
    job = write_job(
        workdir / f"{name}.yaml",
        {
            "name": name,
            "input": {"path": str(args.fasta.resolve())},
            "model": {"name": MODEL, "servers": [address]},
            "output": {
                "path": str(output),
                "tensors": {"embedding": "embedding"},
                "dtype": "float32",
            },
            "chunking": {
                "batch_rows": args.batch,
                "token_budget": args.token_budget,
                "chunk_rows": args.chunk_rows,
            },
            "policy": {"window": args.window},
        },
    )
    result = run_measured(
        tensorfleet_command("run", str(job), "--limit", str(args.sequences)), timeout=1800
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"tensorfleet run exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    speed = speed_line(result.stdout)
    return (
        result.wall_s,
        speed[1] if speed else float("nan"),
        output.with_name(f"{name}.limit{args.sequences}.h5"),
    )


def measure(args: argparse.Namespace, repository: Path, workdir: Path) -> dict:
    import h5py

    from examples.protein.inprocess import load_python_model

    like_a_server_process(args.threads, args.device)
    model = load_python_model(repository / MODEL, device=args.device, precision=args.precision)
    server_args = ["--model", MODEL, "--device", args.device, "--log-level", "WARNING"]
    inprocess, served, dispatch = 0.0, 0.0, 0.0
    with server_process(repository, *server_args, threads=args.threads) as server:
        run_served(server.address, args, workdir, "warmup")
        for index in range(args.rounds):
            local = workdir / f"inprocess-{index}.h5"
            inprocess += run_inprocess(model, args.fasta, args.sequences, args, local)
            wall, seconds, remote = run_served(server.address, args, workdir, f"served-{index}")
            served += wall
            dispatch += seconds
    with h5py.File(local) as a, h5py.File(remote) as b:
        same_ids = list(a["ids"].asstr()[:]) == list(b["ids"].asstr()[:])
        diff = float(np.abs(a["embedding"][:] - b["embedding"][:]).max())
    rows = args.sequences * args.rounds
    return {
        "inprocess_seq_per_s": round(rows / inprocess, 2),
        "tensorfleet_seq_per_s": round(rows / served, 2),
        "ratio": round(inprocess / served, 3),
        "tensorfleet_dispatch_seq_per_s": round(rows / dispatch, 2),
        "ratio_dispatch": round(inprocess / dispatch, 3),
        "same_ids": same_ids,
        "max_abs_diff": diff,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tf-bench-e2e-") as tmp:
        workdir = Path(tmp)
        if args.median:
            from examples.data.make_fasta import synthetic_proteins, write_fasta

            args.fasta = workdir / "synthetic.fasta"
            write_fasta(args.fasta, synthetic_proteins(args.sequences, args.median, 0.55, seed=7))
        repository = build_protein_repository(
            workdir / "models", args.layers, args.dim, args.heads, args.precision
        )
        figures = measure(args, repository, workdir)
    emit(
        {
            "bench": "end_to_end",
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "device": args.device,
            "shape": f"{args.layers}x{args.dim} ({args.heads} heads)",
            "precision": args.precision,
            "threads": args.threads,
            "sequences": args.sequences,
            "batch": args.batch,
            "token_budget": args.token_budget,
            "chunk_rows": args.chunk_rows,
            "window": args.window,
            "rounds": args.rounds,
            **figures,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
