"""What serving costs: the same model, data and device, in-process vs through one server.

(a) in-process: the model folder's own `Model` class, `predict` on batches of B sequences,
    the loop a user would write by hand;
(b) served: one `python -m tensorfleet.services` subprocess on loopback, driven with the
    SDK's `InferenceClient.stream(window=W)`, one request per batch of B sequences.

Both sides get the same torch thread count (`--threads`) and the same batches, in the same
order (sorted by length unless --no-sort, as a careful hand-written loop would). With the
default --batch 64 (the model's max_batch_size) the server cannot merge requests, so both
sides run identical batches and the difference is the cost of serving alone. The sides
alternate A B B A ... for `--rounds` rounds so that drift in machine load hits both alike.
Prints one JSON line: in-process seq/s, served seq/s, their ratio, and the largest
difference between the two sides' embeddings. With --per-residue FP16 (or FP32) the model
returns every residue's state instead of the mean (the in-process loop copies the same
[rows, length, dim] tensors to the host); `output_mb_per_s` says how much crossed the wire.

    python -m bench.serve_overhead                                   # CPU, 6 x 320
    python -m bench.serve_overhead --tiny     # 2 x 64, median 60: where each request's cost shows
    python -m bench.serve_overhead --device cuda --layers 33 --dim 1280 --heads 20 \\
        --precision bf16 --sequences 20000 --batch 64 --window 8 --median 300
    python -m bench.serve_overhead --per-residue FP16                 # per-residue outputs
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from pathlib import Path

import numpy as np

from bench.common import (
    DEMO_FASTA,
    Stopwatch,
    build_protein_repository,
    emit,
    like_a_server_process,
    machine,
    protein_sequences,
    server_process,
    stage_breakdown,
)

MODEL = "protein_embedder"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=320)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--sequences", type=int, default=256, help="sequences per side per round")
    parser.add_argument(
        "--batch",
        type=int,
        default=64,
        help="sequences per predict call / request (64 = max_batch_size: the server runs "
        "the very batches the in-process loop runs)",
    )
    parser.add_argument("--window", type=int, default=4, help="requests in flight on the stream")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fasta", type=Path, default=DEMO_FASTA)
    parser.add_argument(
        "--median",
        type=float,
        default=0.0,
        help="instead of --fasta: synthetic lengths with this median (e.g. 300)",
    )
    parser.add_argument(
        "--no-sort",
        dest="sort",
        action="store_false",
        help="keep file order instead of sorting by length",
    )
    parser.add_argument(
        "--repository", type=Path, help="serve this model repository instead of building one"
    )
    parser.add_argument(
        "--per-residue", choices=["FP16", "FP32"],
        help="return each residue's state in this datatype instead of the mean-pooled embedding",
    )
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model (2 x 64, 4 heads) on 4,000 short synthetic proteins (median 60)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.dim, args.heads, args.median, args.sequences, args.rounds = 2, 64, 4, 60.0, 4000, 4
    return args


def make_batches(args: argparse.Namespace) -> list[np.ndarray]:
    if args.median:
        from examples.data.make_fasta import synthetic_proteins

        sequences = synthetic_proteins(args.sequences, args.median, 0.55, seed=7)
    else:
        sequences = protein_sequences(args.sequences, args.fasta)
    if args.sort:
        sequences = sorted(sequences, key=len, reverse=True)
    return [
        np.array(sequences[start : start + args.batch], dtype=object)
        for start in range(0, len(sequences), args.batch)
    ]


def run_inprocess(model, batches: list[np.ndarray], output: str, clock: Stopwatch) -> list[np.ndarray]:
    with clock.timing():
        return [model.predict({"sequence": batch})[output] for batch in batches]


def run_served(
    client, batches: list[np.ndarray], output: str, window: int, clock: Stopwatch
) -> list[np.ndarray]:
    requests = ({"sequence": batch} for batch in batches)
    with clock.timing():
        return [out[output] for out in client.stream(MODEL, requests, window=window)]


def largest_difference(local: list[np.ndarray], remote: list[np.ndarray]) -> float:
    """Per batch; a served per-residue batch is cut back to its longest sequence."""
    diff = 0.0
    for mine, theirs in zip(local, remote, strict=True):
        index = tuple(slice(0, n) for n in theirs.shape)
        diff = max(diff, float(np.abs(mine[index].astype(np.float32) - theirs.astype(np.float32)).max()))
    return diff


def measure(args: argparse.Namespace, repository: Path) -> dict:
    from examples.protein.inprocess import load_python_model
    from tensorfleet.client import InferenceClient

    like_a_server_process(args.threads, args.device)
    batches = make_batches(args)
    rows = sum(len(batch) for batch in batches)
    residues = sum(len(seq) for batch in batches for seq in batch)
    model = load_python_model(repository / MODEL, device=args.device, precision=args.precision)
    server_args = ["--model", MODEL, "--device", args.device]
    output = "residues" if args.per_residue else "embedding"
    output_bytes = 0
    with server_process(repository, *server_args, threads=args.threads) as server:
        with InferenceClient(server.address) as client:
            warm = batches[:1]  # the longest: the allocator sees its largest shape
            run_inprocess(model, warm, output, Stopwatch())
            run_served(client, warm, output, args.window, Stopwatch())
            inprocess, served = Stopwatch(), Stopwatch()
            diff = 0.0
            for round_number in range(args.rounds):
                # A B, then B A: load that drifts during the run hits both sides alike
                if round_number % 2 == 0:
                    local = run_inprocess(model, batches, output, inprocess)
                    remote = run_served(client, batches, output, args.window, served)
                else:
                    remote = run_served(client, batches, output, args.window, served)
                    local = run_inprocess(model, batches, output, inprocess)
                diff = max(diff, largest_difference(local, remote))
                output_bytes += sum(array.nbytes for array in remote)
                del local, remote
            stats = client.model_statistics(MODEL)
    inference = stats.model_stats[0] if stats.model_stats else None
    mean_batch = (
        inference.inference_count / inference.execution_count
        if inference is not None and inference.execution_count
        else None
    )
    total = rows * args.rounds
    inprocess_rate = total / inprocess.seconds
    served_rate = total / served.seconds
    return {
        "bench": "serve_overhead",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "device": args.device,
        "shape": f"{args.layers}x{args.dim} ({args.heads} heads)",
        "precision": args.precision,
        "output": f"per-residue {args.per_residue}" if args.per_residue else "mean-pooled FP32",
        "output_mb_per_s": round(output_bytes / served.seconds / 1e6, 2),
        "threads": args.threads,
        "sequences": rows,
        "mean_residues": round(residues / rows, 1),
        "batch": args.batch,
        "window": args.window,
        "rounds": args.rounds,
        "inprocess_seq_per_s": round(inprocess_rate, 2),
        "served_seq_per_s": round(served_rate, 2),
        "ratio": round(served_rate / inprocess_rate, 3),
        "round_ratios": [round(a / b, 3) for a, b in zip(inprocess.laps, served.laps, strict=True)],
        "server_mean_batch_rows": round(mean_batch, 2) if mean_batch else None,
        "max_abs_diff": diff,
        "server_stage_mean_ms": stage_breakdown(inference),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repository is not None:
        emit(measure(args, args.repository.resolve()))
        return 0
    with tempfile.TemporaryDirectory(prefix="tf-bench-repo-") as tmp:
        repository = build_protein_repository(
            Path(tmp), args.layers, args.dim, args.heads, args.precision, args.per_residue
        )
        emit(measure(args, repository))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
