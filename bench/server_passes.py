"""Slow passes: several servers side by side, the same passes interleaved, each pass checked.

Why: a server's speed can be bistable. With glibc's single malloc arena (`M_ARENA_MAX=1`,
shipped until issue 25) the model thread and its OpenMP workers sometimes spent a pass
fighting the event loop and gRPC's threads for the arena lock: 18,000-24,000 voluntary
context switches per pass instead of a few hundred, and a third of the throughput gone.
An average over rounds hides that; this bench counts it.

Each variant is one `python -m tensorfleet.services` on loopback with --threads = this
machine's cores (the way a user runs a CPU server) and its own environment:

- `tuned`: this checkout as shipped (services/allocator.py);
- `single-arena`: `TENSORFLEET_MALLOC=single-arena`, the same plus `M_ARENA_MAX=1`: the
  default before issue 25;
- `glibc-default`: `TENSORFLEET_MALLOC=default`, no tuning at all;
- `--source NAME=PATH`: this checkout's tuning from another checkout of the code (e.g. the
  commit before a change, `git worktree add ../base COMMIT`), imported through a PYTHONPATH
  shim, for a before/after of the server's own CPU per request in the same run.

One load generator nobody here wrote drives every server: `tritonclient.grpc` (its own
process, bench/triton_load.py), --window requests in flight, every batch once per pass. The
variants take turns in each round (the order rotates and reverses between rounds, so load
that drifts hits them alike). For each pass, /proc gives every server thread's voluntary
context switches and CPU time before and after.

A pass is **slow** when the busiest thread of the server made more than --slow-switches
voluntary context switches per batch (default 20). Why that measure: a thread that runs a
batch blocks only when it waits for something; the model thread and its OpenMP workers wake
a few times per batch when the device is free of contention (1-5 per batch here), while the
arena fight made them block 150-400 times per batch. Throughput alone cannot tell a slow
pass from a neighbour's load on a shared machine; the switch count can. The line also gives,
per pass, the throughput relative to the round's fastest variant (`vs_round_best`), the
event-loop thread's CPU per request (`loop_cpu_ms_per_request`: the thread that runs the
asyncio loop, the servicer, the batcher, decode and encode: the main thread before issue 25's
main-thread models, the one named `event-loop` since) and the whole process's.

    python -m bench.server_passes                          # tiny model, 5 rounds, 3 variants
    python -m bench.server_passes --rounds 8 --source before=../h-serve-perf-base
    python -m bench.server_passes --layers 6 --dim 320 --heads 20 --sequences 512 --median 0
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import tempfile
from pathlib import Path

from bench.common import (
    REPO_ROOT,
    SLOW_SWITCHES_PER_BATCH,
    Stopwatch,
    build_protein_repository,
    emit,
    machine,
    server_process,
    thread_counters,
)
from bench.serve_overhead import MODEL, TritonLoad, make_batches
from tensorfleet.services.main_thread import LOOP_THREAD_NAME

PACKAGES = ("client", "coordinator", "core", "protos", "services")
VARIANTS = {
    "tuned": {},
    "single-arena": {"TENSORFLEET_MALLOC": "single-arena"},
    "glibc-default": {"TENSORFLEET_MALLOC": "default"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the servers' --threads")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--median", type=float, default=60.0, help="synthetic lengths (0: the example FASTA)")
    parser.add_argument("--sequences", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"which of {', '.join(VARIANTS)}")
    parser.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                        help="also serve from another checkout of the code (this checkout's environment)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="a variant NAME of this checkout with KEY=VALUE in its environment (repeat to add more)")
    parser.add_argument("--slow-switches", type=float, default=SLOW_SWITCHES_PER_BATCH,
                        help="voluntary context switches per batch of the busiest thread above which a pass is slow")
    parser.add_argument("--quick", action="store_true", help="a small run for the smoke test (2 variants, 1 round)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sequences, args.rounds, args.variants = 256, 1, "tuned,glibc-default"
    args.precision, args.fasta, args.sort = "fp32", REPO_ROOT / "examples" / "data" / "proteins.fasta", True
    return args


def shim(source: Path, folder: Path) -> Path:
    """A PYTHONPATH folder whose `tensorfleet` package is `source`'s code (its own protos
    where it has them): the editable install's finder comes after PYTHONPATH."""
    package = folder / "tensorfleet"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in PACKAGES:
        (package / name).symlink_to(source.resolve() / name)
    return folder


def process_faults(pid: int) -> int:
    """Minor page faults of the whole process so far (a block mmapped afresh faults every page)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def loop_thread(pid: int) -> int:
    """The event loop's thread: the one named event-loop (services/main_thread.py), else the main one."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if (task / "comm").read_text().strip() == LOOP_THREAD_NAME:
                return int(task.name)
    return pid


def pass_figures(pid: int, before: dict, after: dict, seconds: float, batches: int, rows: int) -> dict:
    threads = before["threads"]
    switches = {tid: after[tid][0] - threads.get(tid, (0, 0))[0] for tid in after}
    cpu = {tid: after[tid][1] - threads.get(tid, (0, 0))[1] for tid in after}
    return {
        "seq_per_s": rows / seconds,
        "busiest_switches_per_batch": max(switches.values()) / batches,
        "all_switches_per_batch": sum(switches.values()) / batches,
        "loop_cpu_ticks": cpu.get(loop_thread(pid), 0),
        "process_cpu_ticks": sum(cpu.values()),
        "minor_faults_per_batch": (process_faults(pid) - before["faults"]) / batches,
    }


def measure(args: argparse.Namespace, repository: Path, workdir: Path) -> dict:
    variants = {name: dict(VARIANTS[name]) for name in args.variants.split(",") if name}
    for entry in args.env:
        name, _, setting = entry.partition(":")
        key, _, value = setting.partition("=")
        variants.setdefault(name, {})[key] = value
    for entry in args.source:
        name, _, path = entry.partition("=")
        variants[name] = {"PYTHONPATH": str(shim(Path(path), workdir / f"shim-{name}"))}
    batches = make_batches(args)
    rows = sum(len(batch) for batch in batches)
    server_args = ["--model", MODEL, "--device", "cpu", "--log-level", "WARNING"]
    passes: dict[str, list[dict]] = {name: [] for name in variants}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(server_process(repository, *server_args, threads=args.threads, env=env))
                   for name, env in variants.items()}
        load = TritonLoad(batches, args.window, workdir)
        stack.callback(load.close)
        for server in servers.values():
            load.run(server.address, Stopwatch())  # warm-up pass: the allocator and the generator
        names = list(variants)
        for round_number in range(args.rounds):
            start = (round_number // 2) % len(names)
            order = names[start:] + names[:start]
            order = order[::-1] if round_number % 2 else order
            figures = {}
            for name in order:
                pid = servers[name].pid
                clock = Stopwatch()
                before = {"threads": thread_counters(pid), "faults": process_faults(pid)}
                load.run(servers[name].address, clock)
                figures[name] = pass_figures(pid, before, thread_counters(pid), clock.seconds, len(batches), rows)
            best = max(f["seq_per_s"] for f in figures.values())
            for name, figure in figures.items():
                figure["vs_round_best"] = figure["seq_per_s"] / best
                figure["slow"] = figure["busiest_switches_per_batch"] > args.slow_switches
                passes[name].append(figure)
    summary = {}
    tick_ms = 1e3 / os.sysconf("SC_CLK_TCK")
    for name, runs in passes.items():
        summary[name] = {
            "slow_passes": sum(run["slow"] for run in runs),
            "median_seq_per_s": round(statistics.median(run["seq_per_s"] for run in runs), 1),
            "seq_per_s": [round(run["seq_per_s"], 1) for run in runs],
            "vs_round_best": [round(run["vs_round_best"], 3) for run in runs],
            "busiest_switches_per_batch": [round(run["busiest_switches_per_batch"], 1) for run in runs],
            # CPU over all passes (clock ticks are 10 ms: one pass alone is too coarse)
            "loop_cpu_ms_per_request": round(
                sum(run["loop_cpu_ticks"] for run in runs) * tick_ms / (len(runs) * len(batches)), 3),
            "process_cpu_ms_per_request": round(
                sum(run["process_cpu_ticks"] for run in runs) * tick_ms / (len(runs) * len(batches)), 3),
            "minor_faults_per_batch": round(statistics.median(run["minor_faults_per_batch"] for run in runs), 1),
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tf-bench-passes-") as tmp:
        workdir = Path(tmp)
        repository = build_protein_repository(workdir / "models", args.layers, args.dim, args.heads, "fp32")
        variants = measure(args, repository, workdir)
    first = next(iter(variants.values()))
    emit({
        "bench": "server_passes",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": machine(),
        "load_average": os.getloadavg()[0],
        "threads": args.threads,
        "shape": f"{args.layers}x{args.dim} ({args.heads} heads)",
        "sequences": args.sequences,
        "batch": args.batch,
        "window": args.window,
        "rounds": args.rounds,
        "slow_switches_per_batch": args.slow_switches,
        # each variant's median throughput over the first variant's (the first is `tuned` by default)
        **{f"ratio_{name}": round(figures["median_seq_per_s"] / first["median_seq_per_s"], 3)
           for name, figures in list(variants.items())[1:]},
        "variants": variants,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
