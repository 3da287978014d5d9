"""The dispatch ceiling of one coordinator: how many rows a second it can send, and what each costs it.

Servers that answer at once (`bench/sim_devices.py` at 0 ms a row: a null model, in one light
process) leave only the coordinator's own work. Two parts, one JSON line:

1. **dispatch**, by row kind: 16 floats (`f16`), 320 floats (`f320`, an embedding's width) and
   ragged BYTES protein sequences (`bytes`, FASTA, lognormal lengths, median 300; the model
   answers 16 floats a row); `bytes320` and `bytes1280` answer an ESM-2 8M or 650M embedding
   (320 or 1,280 floats a row) instead. Each runs `tensorfleet run` over --dispatch-rows rows
   and reports rows/s and chunks/s over the dispatch span (the job's first lease to its last
   commit, from its manifest) and the coordinator's CPU per row and per chunk over that span
   (psutil samples of its process). `rows_per_s_at_one_core` = 1 / CPU per row: the most one
   coordinator could send if it had a whole core and the servers cost nothing.
2. **phases** at --sizes rows of 16 floats (10^5, 10^6, 10^7): `plan` (`run --dry-run`),
   `dispatch` and `merge` (the same full run: the span above, then from its last commit to the
   process's exit), and `resume` of the finished job (`run --resume` with the output in place:
   input checksum, part checksums, a manifest read). For each: CPU seconds, wall seconds and
   memory. Per-row figures are net of the same commands on a 1,000-row job in the same run
   (interpreter start-up, imports, fleet check), and `<phase>_cpu_per_row_ratio` is the net CPU
   per row at the largest size over the smallest: 1.0 is linear growth.

Memory: peak RSS is the process's VmHWM (it counts the pages of files it maps: the .npy input,
parts read back), peak anonymous RSS the largest RssAnon seen (what it allocated itself); both
read from /proc every 10 ms until it exits.

    python -m bench.dispatch_ceiling                         # dispatch at 10^6 / 2x10^5 rows; phases to 10^7
    python -m bench.dispatch_ceiling --quick                 # 10^4 rows (3 kinds); phases at 10^4, 10^5
    python -m bench.dispatch_ceiling --sizes 100000,1000000,10000000 --kinds f16 --tmp /tmp

Large files (10^7 rows: 640 MB input, as much again in parts and output) go under --tmp and
are removed after each size.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import REPO_ROOT, emit, machine
from bench.fleet import tensorfleet_command, write_job
from bench.scale import CpuSampler, dispatch_span
from bench.sim_devices import SimModel, sim_fleet

MODEL = "null_rows"
BASELINE_ROWS = 1000

#: Row kind -> (input datatype, row shape, the model's output)
KINDS = {
    "f16": ("FP32", (16,), "echo"),
    "f320": ("FP32", (320,), "echo"),
    "bytes": ("BYTES", (), "fp32:16"),
    # the ESM-2 shapes: sequences in, one embedding out (8M: 320 wide; 650M: 1,280 wide)
    "bytes320": ("BYTES", (), "fp32:320"),
    "bytes1280": ("BYTES", (), "fp32:1280"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"row kinds for the dispatch part ({', '.join(KINDS)})")
    parser.add_argument("--dispatch-rows",
                        default="f16=1000000,f320=200000,bytes=200000,bytes320=200000,bytes1280=100000",
                        help="rows per kind for the dispatch part (KIND=N,...; or one N for all)")
    parser.add_argument("--sizes", default="100000,1000000,10000000",
                        help="rows of 16 floats for the phase part, comma-separated ('' skips it)")
    parser.add_argument("--servers", type=int, default=2, help="null-model devices (one light process)")
    parser.add_argument("--batch", type=int, default=256, help="rows per request")
    parser.add_argument("--chunk-rows", type=int, default=4096, help="rows per checkpointed chunk")
    parser.add_argument("--window", type=int, default=4, help="requests in flight per server")
    parser.add_argument("--tmp", type=Path, default=None, help="where the inputs, parts and outputs go")
    parser.add_argument("--quick", action="store_true",
                        help="10^4 rows of f16, f320 and bytes; phases at 10^4 and 10^5")
    args = parser.parse_args(argv)
    if args.quick:
        args.kinds, args.dispatch_rows, args.sizes = "f16,f320,bytes", "10000", "10000,100000"
    return args


def rows_by_kind(text: str, kinds: list[str]) -> dict[str, int]:
    if "=" not in text:
        return dict.fromkeys(kinds, int(float(text)))
    given = {key: int(float(value)) for key, value in (item.split("=") for item in text.split(","))}
    return {kind: given[kind] for kind in kinds}


# --- inputs ---------------------------------------------------------------------------------------
def write_floats(path: Path, rows: int, width: int) -> Path:
    """An .npy of `rows` x `width` float32, written block by block (10^7 rows never sit in memory)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, width))
    block = 1 << 18
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        array[start:stop] = np.arange(start * width, stop * width, dtype=np.float32).reshape(-1, width)
    array.flush()
    del array
    return path


def write_sequences(path: Path, rows: int) -> Path:
    """A FASTA of `rows` synthetic proteins (median 300 residues), written in blocks."""
    sys.path.insert(0, str(REPO_ROOT / "examples" / "data"))
    from make_fasta import synthetic_proteins

    with open(path, "wb") as out:
        for start in range(0, rows, 50_000):
            sequences = synthetic_proteins(min(50_000, rows - start), 300.0, 0.55, seed=start)
            out.write(b"".join(b">p%d\n%s\n" % (start + i, s) for i, s in enumerate(sequences)))
    return path


def write_input(folder: Path, kind: str, rows: int) -> Path:
    datatype, shape, _ = KINDS[kind]
    if datatype == "BYTES":
        return write_sequences(folder / f"{kind}-{rows}.fasta", rows)
    return write_floats(folder / f"{kind}-{rows}.npy", rows, shape[0])


# --- one measured command -----------------------------------------------------------------------
@dataclass
class Measured:
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    peak_anon_mb: float  # sampled every 10 ms
    ended_at: float  # time.time() when it exited
    sampler: CpuSampler | None
    stdout: str


def measured(command: list[str], sample: bool = False, timeout: float = 3600.0) -> Measured:
    """Run `command`; its CPU and peak RSS from the kernel (wait4), optionally CPU samples over time."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO_ROOT)
        sampler = CpuSampler(process.pid, interval=0.05) if sample else None
        deadline = time.monotonic() + timeout
        peak_kb = anon_kb = 0
        try:
            while True:
                high_water, anonymous = memory_kb(process.pid)
                peak_kb, anon_kb = max(peak_kb, high_water), max(anon_kb, anonymous)
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{command} still running after {timeout:.0f}s")
                time.sleep(0.01)
        except BaseException:
            process.kill()
            process.wait()
            raise
        ended = time.time()
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if sampler is not None:
            sampler.join()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{stdout}\n"
                               f"{err.read().decode(errors='replace')[-3000:]}")
        return Measured(wall, usage.ru_utime + usage.ru_stime, peak_kb / 1024, anon_kb / 1024, ended, sampler, stdout)


def memory_kb(pid: int) -> tuple[int, int]:
    """(peak RSS so far: VmHWM, anonymous RSS now: RssAnon) of a process; zeros once it is gone.

    Not wait4's ru_maxrss: Linux carries the parent's RSS at fork over the child's exec into
    it, so every child of this (100+ MB) process would report at least that. VmHWM counts the
    pages of files it maps too (an .npy input is read through a memory map, parts are read back
    by mmap): RssAnon is the memory the process itself allocated."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmHWM:", "RssAnon:")):
                    key, amount = line.split()[:2]
                    values[key] = int(amount)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return values.get("VmHWM:", 0), values.get("RssAnon:", 0)


def job_for(folder: Path, name: str, data: Path, addresses: list[str], args: argparse.Namespace) -> Path:
    spec = {
        "name": name,
        "input": {"path": str(data)},
        "model": {"name": MODEL, "servers": addresses},
        "output": {"path": str(folder / f"{name}.h5")},
        "chunking": {"batch_rows": args.batch, "chunk_rows": args.chunk_rows},
        "policy": {"window": args.window, "shared_memory": False},
    }
    return write_job(folder / f"{name}.yaml", spec)


def sim_cpu_s(pids: list[int]) -> float:
    import psutil

    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def full_run(job: Path, pids: list[int]) -> dict:
    """`tensorfleet run JOB`: the dispatch span's figures, then the merge (last commit -> exit)."""
    sim_before = sim_cpu_s(pids)
    run = measured(tensorfleet_command("run", str(job)), sample=True)
    sim_used = sim_cpu_s(pids) - sim_before
    job_dir = job.with_suffix(".h5.tfjob")
    span = dispatch_span(job_dir)
    seconds = span["last"] - span["first"]
    sampler = run.sampler
    assert sampler is not None
    dispatch_cpu = sampler.at(span["last"]) - sampler.at(span["first"])
    return {
        "rows": span["rows"],
        "chunks": span["chunks"],
        "dispatch_s": seconds,
        "dispatch_cpu_s": dispatch_cpu,
        "before_dispatch_cpu_s": sampler.at(span["first"]),
        "merge_s": run.ended_at - span["last"],
        "merge_cpu_s": max(0.0, run.cpu_s - sampler.at(span["last"])),
        "wall_s": run.wall_s,
        "cpu_s": run.cpu_s,
        "peak_rss_mb": run.peak_rss_mb,
        "peak_anon_mb": run.peak_anon_mb,
        "servers_cpu_s": sim_used,
    }


# --- part 1: dispatch by row kind ---------------------------------------------------------------
def dispatch_kind(kind: str, rows: int, folder: Path, args: argparse.Namespace) -> dict:
    datatype, shape, output = KINDS[kind]
    model = SimModel(MODEL, args.batch, datatype, shape, output)
    data = write_input(folder, kind, rows)
    with sim_fleet(args.servers, 0.0, model) as fleet:
        job = job_for(folder, f"dispatch-{kind}", data, fleet.addresses, args)
        run = full_run(job, fleet.pids)
    shutil.rmtree(job.with_suffix(".h5.tfjob"))
    data.unlink()
    seconds, cpu = run["dispatch_s"], run["dispatch_cpu_s"]
    requests = -(-run["rows"] // args.batch)
    figures = {
        "rows": run["rows"],
        "chunks": run["chunks"],
        "rows_per_s": round(run["rows"] / seconds, 1),
        "chunks_per_s": round(run["chunks"] / seconds, 2),
        "coordinator_cpu_us_per_row": round(cpu / run["rows"] * 1e6, 3),
        "coordinator_cpu_ms_per_chunk": round(cpu / run["chunks"] * 1e3, 3),
        "coordinator_cpu_fraction_of_core": round(cpu / seconds, 3),
        "rows_per_s_at_one_core": round(run["rows"] / cpu, 1),
        "servers_cpu_us_per_request": round(run["servers_cpu_s"] / requests * 1e6, 1),
        "peak_rss_mb": round(run["peak_rss_mb"], 1),
        "peak_anon_mb": round(run["peak_anon_mb"], 1),
    }
    print(f"dispatch {kind}: {figures}", file=sys.stderr, flush=True)
    return figures


# --- part 2: plan, dispatch, merge, resume by size ------------------------------------------------
def phases_at(rows: int, folder: Path, addresses: list[str], pids: list[int], args: argparse.Namespace) -> dict:
    data = write_floats(folder / f"phases-{rows}.npy", rows, 16)
    job = job_for(folder, f"phases-{rows}", data, addresses, args)
    plan = measured(tensorfleet_command("run", str(job), "--dry-run"))
    run = full_run(job, pids)
    resume = measured(tensorfleet_command("run", str(job), "--resume"))
    figures = {
        "rows": rows,
        "chunks": run["chunks"],
        "plan": {"cpu_s": plan.cpu_s, "wall_s": plan.wall_s, "peak_rss_mb": plan.peak_rss_mb,
                 "peak_anon_mb": plan.peak_anon_mb},
        "dispatch": {"cpu_s": run["dispatch_cpu_s"], "wall_s": run["dispatch_s"]},
        "merge": {"cpu_s": run["merge_cpu_s"], "wall_s": run["merge_s"]},
        "run": {"cpu_s": run["cpu_s"], "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"],
                "peak_anon_mb": run["peak_anon_mb"], "before_dispatch_cpu_s": run["before_dispatch_cpu_s"]},
        "resume": {"cpu_s": resume.cpu_s, "wall_s": resume.wall_s, "peak_rss_mb": resume.peak_rss_mb,
                   "peak_anon_mb": resume.peak_anon_mb},
        "output_mb": round(Path(folder / f"phases-{rows}.h5").stat().st_size / 1e6, 1),
    }
    shutil.rmtree(job.with_suffix(".h5.tfjob"))
    for path in folder.glob(f"*phases-{rows}*"):
        path.unlink()
    print(f"phases {rows}: {figures}", file=sys.stderr, flush=True)
    return figures


def net_per_row(level: dict, base: dict, phase: str, key: str) -> float:
    """Seconds per row of `phase` above the 1,000-row job's."""
    return (level[phase][key] - base[phase][key]) / (level["rows"] - base["rows"])


def phase_summary(levels: list[dict], base: dict) -> dict:
    summary: dict = {}
    for phase in ("plan", "dispatch", "merge", "resume"):
        for level in levels:
            rows = level["rows"]
            summary[f"{phase}_cpu_us_per_row_{rows}"] = round(net_per_row(level, base, phase, "cpu_s") * 1e6, 3)
            summary[f"{phase}_wall_s_{rows}"] = round(level[phase]["wall_s"], 2)
        first, last = levels[0], levels[-1]
        low = net_per_row(first, base, phase, "cpu_s")
        if len(levels) > 1:  # None: the smallest size's net CPU was within noise of the baseline's
            high = net_per_row(last, base, phase, "cpu_s")
            summary[f"{phase}_cpu_per_row_ratio"] = round(high / low, 3) if low > 0 else None
    if len(levels) > 1:
        first, last = levels[0], levels[-1]
        summary["merge_wall_per_row_ratio"] = round(
            (last["merge"]["wall_s"] / last["rows"]) / (first["merge"]["wall_s"] / first["rows"]), 3)
    commands = ("plan", "run", "resume")
    for level in levels:
        rows = level["rows"]
        summary[f"peak_rss_mb_{rows}"] = {name: round(level[name]["peak_rss_mb"], 1) for name in commands}
        summary[f"peak_anon_mb_{rows}"] = {name: round(level[name]["peak_anon_mb"], 1) for name in commands}
    for key, level in (("largest", levels[-1]), ("1000_rows", base)):
        summary[f"peak_rss_mb_{key}"] = round(max(level[name]["peak_rss_mb"] for name in commands), 1)
        summary[f"peak_anon_mb_{key}"] = round(max(level[name]["peak_anon_mb"] for name in commands), 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = [kind for kind in args.kinds.split(",") if kind]
    sizes = [int(float(size)) for size in args.sizes.split(",") if size]
    load = os.getloadavg()
    record: dict = {"bench": "dispatch_ceiling", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
                    "machine": machine(), "load_at_start": [round(x, 2) for x in load], "servers": args.servers,
                    "batch_rows": args.batch, "chunk_rows": args.chunk_rows, "window": args.window}
    folder = Path(tempfile.mkdtemp(prefix="tf-ceiling-", dir=args.tmp))
    try:
        for kind, rows in rows_by_kind(args.dispatch_rows, kinds).items():
            figures = dispatch_kind(kind, rows, folder, args)
            record[f"dispatch_{kind}"] = figures
            record[f"rows_per_s_{kind}"] = figures["rows_per_s"]
            record[f"cpu_us_per_row_{kind}"] = figures["coordinator_cpu_us_per_row"]
        if sizes:
            model = SimModel(MODEL, args.batch, "FP32", (16,), "echo")
            with sim_fleet(args.servers, 0.0, model) as fleet:
                base = phases_at(BASELINE_ROWS, folder, fleet.addresses, fleet.pids, args)
                levels = [phases_at(rows, folder, fleet.addresses, fleet.pids, args) for rows in sizes]
            record["phases"] = [base, *levels]
            record.update(phase_summary(levels, base))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    record["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    emit(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
