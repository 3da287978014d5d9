"""Why each model runs on the thread that loaded it (services/model_runtime.py).

In one process, the tiny protein embedder (2 x 64) is loaded and warmed on thread A; then
the same batches run alternately on thread A and on a second thread B, --rounds times.
torch's intra-op (OpenMP) team belongs to the thread that first used it: from another
thread each parallel region pays for a team of its own. Prints one JSON line: seq/s on
each thread, `ratio` (B / A: what running on a thread other than the loader's costs) and
the voluntary context switches of each thread per pass (Linux getrusage RUSAGE_THREAD).

    python -m bench.model_thread --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import build_protein_repository, emit, like_a_server_process, machine

MODEL = "protein_embedder"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--sequences", type=int, default=2000)
    parser.add_argument("--median", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.sequences, args.rounds = 256, 2
    return args


def one_pass(model, batches: list[np.ndarray]) -> tuple[float, int]:
    """(seconds, voluntary context switches of this thread) for one pass over the batches."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    started = time.perf_counter()
    for batch in batches:
        model.predict({"sequence": batch})
    return time.perf_counter() - started, resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before


def measure(args: argparse.Namespace, repository: Path) -> dict:
    from examples.data.make_fasta import synthetic_proteins
    from examples.protein.inprocess import load_python_model

    like_a_server_process(args.threads)
    sequences = sorted(synthetic_proteins(args.sequences, args.median, 0.55, seed=7), key=len, reverse=True)
    batches = [np.array(sequences[i : i + args.batch], dtype=object) for i in range(0, len(sequences), args.batch)]
    loader = ThreadPoolExecutor(1, thread_name_prefix="loader")
    other = ThreadPoolExecutor(1, thread_name_prefix="other")
    model = loader.submit(load_python_model, repository / MODEL).result()
    seconds = {"loader": 0.0, "other": 0.0}
    switches = {"loader": 0, "other": 0}
    for round_number in range(args.rounds):
        order = ["loader", "other"] if round_number % 2 == 0 else ["other", "loader"]
        for side in order:
            pool = loader if side == "loader" else other
            spent, switched = pool.submit(one_pass, model, batches).result()
            seconds[side] += spent
            switches[side] += switched
    loader.shutdown()
    other.shutdown()
    total = len(sequences) * args.rounds
    return {
        "loader_thread_seq_per_s": round(total / seconds["loader"], 1),
        "other_thread_seq_per_s": round(total / seconds["other"], 1),
        "ratio": round(seconds["loader"] / seconds["other"], 3),
        "voluntary_switches_per_pass_loader": switches["loader"] // args.rounds,
        "voluntary_switches_per_pass_other": switches["other"] // args.rounds,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tf-bench-thread-") as tmp:
        repository = build_protein_repository(Path(tmp), 2, 64, 4, "fp32")
        figures = measure(args, repository)
    emit({"bench": "model_thread", "date": datetime.date.today().isoformat(), "machine": machine(),
          "threads": args.threads, "sequences": args.sequences, "batch": args.batch, "rounds": args.rounds,
          **figures})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
