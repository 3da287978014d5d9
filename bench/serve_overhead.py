"""What serving costs: the same model, data and device, in-process vs through one server.

(a) in-process: the model folder's own `Model` class, `predict` on batches of B sequences,
    the loop a user would write by hand;
(b) served: one `python -m tensorfleet.services` subprocess on loopback, driven with the
    SDK's `InferenceClient.stream(window=W)`, one request per batch of B sequences.

Both sides get the same torch thread count (`--threads`, by default this machine's cores:
what a user's CPU server runs with) and the same batches, in the same
order (sorted by length unless --no-sort, as a careful hand-written loop would). With the
default --batch 64 (the model's max_batch_size) the server cannot merge requests, so both
sides run identical batches and the difference is the cost of serving alone. The sides
alternate A B B A ... for `--rounds` rounds so that drift in machine load hits both alike.
Prints one JSON line: in-process seq/s, served seq/s, their ratio, and the largest
difference between the two sides' embeddings.

MLServer as a baseline (issue 15; with --tiny, or --mlserver): when `make mlserver-venv` has
built `.venv-mlserver`, the same run also starts MLServer 1.7.1 twice on loopback, serving the
same encoder.pt through bench/mlserver_runtime, without and with its adaptive batching. Both
MLServers and the tensorfleet server are then driven by one load generator nobody here wrote,
`tritonclient.grpc` (bench/triton_load.py, its own process: the same --window requests in
flight, the same batches), interleaved with the other paths over the same rounds. The line
adds `tritonclient_seq_per_s` (tensorfleet through it), `mlserver_seq_per_s` (the best
setting), `mlserver_best_setting`, `mlserver_settings`, `ratio_vs_mlserver` (tensorfleet /
MLServer's best, same load generator) and `mlserver_max_abs_diff` (vs the in-process loop).
Without the venv it says `"mlserver": "skipped: ..."` and measures the rest. With --per-residue FP16 (or FP32) the model
returns every residue's state instead of the mean (the in-process loop copies the same
[rows, length, dim] tensors to the host); `output_mb_per_s` says how much crossed the wire.

    python -m bench.serve_overhead                                   # CPU, 6 x 320
    python -m bench.serve_overhead --tiny     # 2 x 64, median 60: where each request's cost shows
    python -m bench.serve_overhead --device cuda --layers 33 --dim 1280 --heads 20 \\
        --precision bf16 --sequences 20000 --batch 64 --window 8 --median 300
    python -m bench.serve_overhead --per-residue FP16                 # per-residue outputs
    make mlserver-venv && python -m bench.serve_overhead --tiny      # + MLServer, same run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import mlserver_baseline
from bench.batch_file import write_batches
from bench.common import (
    DEMO_FASTA,
    REPO_ROOT,
    SLOW_SWITCHES_PER_BATCH,
    Stopwatch,
    build_protein_repository,
    busiest_switches,
    emit,
    like_a_server_process,
    machine,
    protein_sequences,
    server_process,
    stage_breakdown,
    thread_counters,
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
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads, both sides (default: this machine's cores, as a user's server runs)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="A B B A rounds (default 2; 4 with --tiny, whose passes are short: on a noisy "
                        "2-core VM one pass's ratio scatters by +-10%%, so give more for an acceptance figure)")
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
    parser.add_argument(
        "--mlserver", action=argparse.BooleanOptionalAction, default=None,
        help="also measure MLServer (from .venv-mlserver) and tensorfleet through tritonclient; "
        "on with --tiny",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.dim, args.heads, args.median, args.sequences = 2, 64, 4, 60.0, 4000
    if args.rounds is None:
        args.rounds = 4 if args.tiny else 2
    if args.mlserver is None:
        args.mlserver = args.tiny
    if args.mlserver and args.per_residue:
        parser.error("--mlserver compares the mean-pooled embedding; drop --per-residue")
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


class TritonLoad:
    """The tritonclient.grpc load generator (bench/triton_load.py), one process for the run."""

    def __init__(self, batches: list[np.ndarray], window: int, folder: Path) -> None:
        self.folder = folder
        write_batches(batches, folder / "batches.txt")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.triton_load", "--batches", str(folder / "batches.txt"),
             "--window", str(window)],
            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def run(self, address: str, clock: Stopwatch) -> np.ndarray:
        """Every batch once against `address`; the time the generator measured goes to clock."""
        out = self.folder / "outputs.npy"
        self.process.stdin.write(json.dumps({"url": address, "model": MODEL, "out": str(out)}) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if not reply:
            raise SystemExit(f"the tritonclient load generator exited ({self.process.wait()})")
        seconds = json.loads(reply)["seconds"]
        clock.laps.append(seconds)
        clock.seconds += seconds
        return np.load(out)

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


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
    use_mlserver = args.mlserver and mlserver_baseline.available()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(server_process(repository, *server_args, threads=args.threads))
        client = stack.enter_context(InferenceClient(server.address))
        # every path: a name -> a callable running all batches and returning its outputs
        paths = {
            "inprocess": lambda clock: run_inprocess(model, batches, output, clock),
            "served": lambda clock: run_served(client, batches, output, args.window, clock),
        }
        if use_mlserver:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tf-bench-load-")))
            load = TritonLoad(batches, args.window, folder)
            stack.callback(load.close)
            paths["tritonclient"] = lambda clock: load.run(server.address, clock)
            for setting in mlserver_baseline.SETTINGS:
                baseline = stack.enter_context(mlserver_baseline.mlserver_process(
                    repository / MODEL, MODEL, setting, args.threads))  # fmt: skip
                paths[f"mlserver_{setting}"] = lambda clock, a=baseline.grpc_address: load.run(a, clock)
        warm = batches[:1]  # the longest: the allocator sees its largest shape
        run_inprocess(model, warm, output, Stopwatch())
        run_served(client, warm, output, args.window, Stopwatch())
        for name in paths:
            if name not in ("inprocess", "served"):
                paths[name](Stopwatch())  # a whole pass: their warm-up and the generator's
        clocks = {name: Stopwatch() for name in paths}
        # tensorfleet's passes: the busiest server thread's voluntary context switches per batch
        switches: dict[str, list[float]] = {name: [] for name in ("served", "tritonclient") if name in paths}
        diffs = dict.fromkeys(paths, 0.0)
        names = list(paths)
        for round_number in range(args.rounds):
            # odd rounds run the even round before them backwards (A B, then B A) and each pair
            # starts at another path, so load that drifts during the run hits every path alike
            start = (round_number // 2) % len(names)
            order = names[start:] + names[:start]
            order = order[::-1] if round_number % 2 else order
            results = {}
            for name in order:
                before = thread_counters(server.pid) if name in switches else None
                results[name] = paths[name](clocks[name])
                if before is not None:
                    switches[name].append(busiest_switches(before, thread_counters(server.pid)) / len(batches))
            local = results.pop("inprocess")
            served_batches = results.pop("served")
            diffs["served"] = max(diffs["served"], largest_difference(local, served_batches))
            output_bytes += sum(array.nbytes for array in served_batches)
            for name, flat in results.items():
                diffs[name] = max(diffs[name], largest_difference([np.concatenate(local)], [flat]))
            del local, served_batches, results
        stats = client.model_statistics(MODEL)
    inprocess, served, diff = clocks["inprocess"], clocks["served"], diffs["served"]
    inference = stats.model_stats[0] if stats.model_stats else None
    mean_batch = (
        inference.inference_count / inference.execution_count
        if inference is not None and inference.execution_count
        else None
    )
    total = rows * args.rounds
    inprocess_rate = total / inprocess.seconds
    served_rate = total / served.seconds
    record = {
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
        # a pass is slow when the server's busiest thread blocked > SLOW_SWITCHES_PER_BATCH
        # times per batch (bench/server_passes.py: the single malloc arena's bistability)
        "slow_passes": sum(value > SLOW_SWITCHES_PER_BATCH for values in switches.values() for value in values),
        "busiest_switches_per_batch": {name: [round(v, 1) for v in values] for name, values in switches.items()},
    }
    if not args.mlserver:
        return record
    if not use_mlserver:
        record["mlserver"] = f"skipped: {mlserver_baseline.MLSERVER} not found (make mlserver-venv)"
        print(f"serve_overhead: MLServer {record['mlserver']}", file=sys.stderr)
        return record
    rates = {name: total / clocks[name].seconds for name in clocks}
    settings = {s: rates[f"mlserver_{s}"] for s in mlserver_baseline.SETTINGS}
    best = max(settings, key=settings.get)
    record.update({
        "tritonclient_seq_per_s": round(rates["tritonclient"], 2),
        "tritonclient_ratio": round(rates["tritonclient"] / inprocess_rate, 3),
        "mlserver_seq_per_s": round(settings[best], 2),
        "mlserver_best_setting": best,
        "mlserver_settings": {name: round(rate, 2) for name, rate in settings.items()},
        "ratio_vs_mlserver": round(rates["tritonclient"] / settings[best], 3),
        "round_ratios_vs_mlserver": [
            round(b / a, 3) for a, b in zip(clocks["tritonclient"].laps, clocks[f"mlserver_{best}"].laps, strict=True)
        ],
        "tritonclient_max_abs_diff": diffs["tritonclient"],
        "mlserver_max_abs_diff": max(diffs[f"mlserver_{s}"] for s in mlserver_baseline.SETTINGS),
    })
    return record


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
