"""Chaos: three kinds of job under a seeded sequence of faults, each output compared bitwise
with a fault-free run of the same job made in the same bench run.

Jobs: the bundled protein embedder over the first --rows proteins (one model, HDF5), a
two-stage job (the test embedder, then tests/coordinator/models/head16; parquet) and a models x
sources sweep (the epistasis example's two embedders over three FASTA sources; one parquet sheet per model). The
servers are this bench's own, each behind a loopback TCP proxy (bench/chaos_proxy.py) that
the jobs name in model.servers.

Faults (kinds in the JSON line): server_kill (kill -9 of one server, back on its port a
moment later), all_servers_kill, server_stop (SIGSTOP longer than request_timeout_s, then
SIGCONT), proxy_reset / proxy_delay / proxy_black_hole, coordinator_kill (kill -9 at a random
moment, then --resume), crash_part_renamed / crash_merge (kill -9 at those named points via
TENSORFLEET_CRASH_AT), part_corrupt / part_truncate (a committed part damaged while the
coordinator is down), disk_full (the job folder on a small tmpfs; needs root).

Rows computed more than once come from the servers' ModelStatistics (inference_count),
polled every 0.3 s and just before each kill: rows a server computed after its last poll and
before a kill -9 are not seen, so the figure is a lower bound; rows lost is exact (the output
holds every input id exactly once, with ok set, bitwise equal to the reference).

A planned fault counts only once injected: a job that finishes before its plan's next server
or coordinator fault leaves it in `faults_planned_not_reached`.

Run: python -m bench.chaos [--quick] [--seed N] [--rows N] [--faults N]; prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

from bench.chaos_proxy import ChaosProxy
from bench.common import REPO_ROOT, emit, launch_server, machine

TEST_MODELS = REPO_ROOT / "tests" / "coordinator" / "models"
MODELS = {
    "protein_embedder": REPO_ROOT / "examples" / "models" / "protein_embedder",
    "embed": TEST_MODELS / "embed",
    "head16": TEST_MODELS / "head16",
    "embed_tiny": REPO_ROOT / "examples" / "epistasis" / "models" / "embed_tiny",
    "embed_small": REPO_ROOT / "examples" / "epistasis" / "models" / "embed_small",
}
REQUEST_TIMEOUT_S = 8.0  # above the slowest request on a loaded 2-core machine (token_budget 1024)
# The test embedder sleeps per batch, so its jobs last long enough for faults to land.
SERVER_ENV = {"OMP_NUM_THREADS": "1", "TF_TEST_DELAY_MS": "60"}
SERVER_FAULTS = ["server_kill", "all_servers_kill", "server_stop", "proxy_reset", "proxy_delay", "proxy_black_hole"]
RUN_FAULTS = ["coordinator_kill", "crash_part_renamed", "crash_merge"]


class Backend:
    """One server process (relaunched on the same port after a kill) behind its proxy;
    counts the rows it computed per model over all its incarnations."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self.server = launch_server(repository, "--threads", "1", env=SERVER_ENV, timeout=300)
        self.port = self.server.port
        self.proxy = ChaosProxy(self.port)
        self.stopped = False
        self.finished: Counter = Counter()  # rows computed by earlier incarnations
        self.seen: Counter = Counter()  # rows computed by this one, at the last poll
        self.lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def poll(self) -> None:
        if self.stopped or self.server.process.poll() is not None:
            return
        from tensorfleet.client import InferenceClient

        with contextlib.suppress(Exception), InferenceClient(self.address) as client:
            for stats in client.model_statistics().model_stats:
                with self.lock:
                    self.seen[stats.name] = max(self.seen[stats.name], int(stats.inference_count))

    def computed(self) -> Counter:
        with self.lock:
            return self.finished + self.seen

    def kill(self) -> None:
        self.poll()
        self.server.stop(signal.SIGKILL)
        with self.lock:
            self.finished += self.seen
            self.seen = Counter()

    def revive(self) -> None:
        for _ in range(20):  # the port may linger a moment after the kill
            try:
                self.server = launch_server(
                    self.repository, "--threads", "1", "--port", str(self.port), env=SERVER_ENV, timeout=300
                )
                return
            except RuntimeError:
                time.sleep(0.5)
        raise RuntimeError(f"server on port {self.port} did not come back")

    def stop(self) -> None:
        self.proxy.close()
        if self.stopped:
            os.kill(self.server.pid, signal.SIGCONT)
        self.server.stop(signal.SIGKILL)


class Injector:
    """Server and network faults, at seeded random moments, while a coordinator runs."""

    def __init__(self, rng: random.Random, fleet: list[Backend], faults: Counter) -> None:
        self.rng, self.fleet, self.faults = rng, fleet, faults
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.3):
            for backend in self.fleet:
                backend.poll()

    def inject(self, kind: str) -> None:
        rng, fleet = self.rng, self.fleet
        victim = rng.choice(fleet)
        if kind == "server_kill":
            victim.kill()
            time.sleep(rng.uniform(0.2, 1.5))
            victim.revive()
        elif kind == "all_servers_kill":
            for backend in fleet:
                backend.kill()
            time.sleep(rng.uniform(0.5, 2.0))
            for backend in fleet:
                backend.revive()
        elif kind == "server_stop":
            victim.poll()
            victim.stopped = True
            os.kill(victim.server.pid, signal.SIGSTOP)
            time.sleep(REQUEST_TIMEOUT_S + rng.uniform(1.0, 2.0))
            os.kill(victim.server.pid, signal.SIGCONT)
            victim.stopped = False
        elif kind == "proxy_reset":
            victim.proxy.reset()
        elif kind == "proxy_delay":
            victim.proxy.delay(rng.uniform(0.05, 0.4), rng.uniform(1.0, 3.0))
        elif kind == "proxy_black_hole":
            victim.proxy.black_hole(REQUEST_TIMEOUT_S + rng.uniform(0.5, 1.5))
            time.sleep(REQUEST_TIMEOUT_S + 2)
        self.faults[kind] += 1

    def close(self) -> None:
        self._stop.set()
        self._poller.join()


def coordinator(job: Path, *flags: str, env: dict | None = None, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "tensorfleet.coordinator", "run", str(job), *flags]
    with open(log, "ab") as handle:
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )


# --- the three jobs -----------------------------------------------------------------------
def write_fasta_subset(source: Path, target: Path, rows: int) -> None:
    from examples.protein.fasta import read_fasta

    ids, sequences = read_fasta(source)
    with open(target, "w") as handle:
        for name, sequence in list(zip(ids, sequences, strict=True))[:rows]:
            handle.write(f">{name}\n{sequence.decode()}\n")


def job_specs(folder: Path, servers: list[str]) -> dict[str, dict]:
    policy = {"window": 2, "retries": 1000, "request_timeout_s": REQUEST_TIMEOUT_S, "server_wait_s": 120}
    return {
        "protein": {
            "name": "chaos-protein", "input": {"path": "proteins.fasta"},
            "model": {"name": "protein_embedder", "servers": servers},
            "output": {"path": "out/protein.h5", "tensors": {"embedding": "embedding"}, "dtype": "float32"},
            "chunking": {"chunk_rows": 8, "token_budget": 1024}, "policy": policy,
        },
        "pipeline": {
            "name": "chaos-pipeline", "input": {"path": "more-proteins.fasta"},
            "stages": [
                {"name": "embed", "model": {"name": "embed", "servers": servers}, "batch_rows": 8},
                {"name": "head", "model": {"name": "head16", "servers": servers},
                 "tensors": {"x": "embedding"}, "batch_rows": 16},
            ],
            "output": {"path": "out/pipeline.parquet"}, "chunking": {"chunk_rows": 24}, "policy": policy,
        },
        "sweep": {
            "name": "chaos-sweep",
            "sources": [
                {"name": "singles", "path": "singles.fasta"}, {"name": "doubles", "path": "doubles.fasta"},
                {"name": "proteins", "path": "proteins.fasta"},
            ],
            "models": [
                {"name": "embed_small", "servers": servers, "batch_rows": 8, "outputs": {"embedding": "embedding"}},
                {"name": "embed_tiny", "servers": servers, "batch_rows": 8, "outputs": {"embedding": "embedding"}},
            ],
            "output": {"dir": "out/sweep"}, "chunking": {"chunk_rows": 16}, "policy": policy,
        },
    }


def expected_rows(kind: str, rows: dict[str, int]) -> Counter:
    if kind == "protein":
        return Counter({"protein_embedder": rows["proteins"]})
    if kind == "pipeline":
        return Counter({"embed": rows["more-proteins"], "head16": rows["more-proteins"]})
    both = rows["singles"] + rows["doubles"] + rows["proteins"]
    return Counter({"embed_small": both, "embed_tiny": both})


def prepare(work: Path, name: str, kind: str, servers: list[str], data: Path) -> Path:
    folder = work / name
    folder.mkdir(parents=True)
    for file in data.iterdir():
        os.symlink(file, folder / file.name)
    job = folder / "job.yaml"
    job.write_text(yaml.safe_dump(job_specs(folder, servers)[kind]))
    return job


# --- comparing outputs --------------------------------------------------------------------
def output_files(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "out").rglob("*") if p.suffix in (".h5", ".parquet") and not p.name.startswith("."))


def _bytes(values) -> bytes:
    import numpy as np

    values = np.asarray(values)
    if values.dtype.kind == "O":  # strings: their bytes, not the object pointers
        return b"\0".join(v if isinstance(v, bytes) else str(v).encode() for v in values.ravel())
    return values.tobytes()


def contents(path: Path) -> tuple[list[str], dict[str, bytes]]:
    """(ids of rows with ok set, every column's bytes) of one output file, metadata left out."""

    if path.suffix == ".h5":
        import h5py

        with h5py.File(path) as f:
            ids = [v.decode() for v, ok in zip(f["ids"][:], f["ok"][:], strict=True) if ok]
            return ids, {name: _bytes(f[name][:]) for name in sorted(f.keys()) if isinstance(f[name], h5py.Dataset)}
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path).replace_schema_metadata(None)
    id_column = next(n for n in table.column_names if n in ("id", "ids", "domain"))
    ok = table.column("ok").to_pylist() if "ok" in table.column_names else [True] * table.num_rows
    ids = [i for i, good in zip(table.column(id_column).to_pylist(), ok, strict=True) if good]
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return ids, {"table": sink.getvalue()}


def compare(reference: Path, result: Path) -> tuple[bool, int]:
    """(bitwise identical, rows lost) over every output file of the job."""
    identical, lost = True, 0
    ref_files, out_files = output_files(reference), output_files(result)
    if [p.relative_to(reference) for p in ref_files] != [p.relative_to(result) for p in out_files]:
        return False, sum(len(contents(p)[0]) for p in ref_files)
    for ref, out in zip(ref_files, out_files, strict=True):
        ref_ids, ref_columns = contents(ref)
        ids, columns = contents(out)
        identical &= ref_columns == columns and ids == ref_ids
        lost += len(set(ref_ids) - set(ids))
    return identical, lost


# --- one job under faults -----------------------------------------------------------------
def damage_a_part(rng: random.Random, job_dir: Path, faults: Counter) -> None:
    parts = sorted(job_dir.rglob("chunk-*.part"))
    if not parts:
        return
    victim = rng.choice(parts)
    data = bytearray(victim.read_bytes())
    if rng.random() < 0.5:
        victim.write_bytes(bytes(data[: rng.randrange(len(data))]))
        faults["part_truncate"] += 1
    else:
        data[rng.randrange(len(data))] ^= 0xFF
        victim.write_bytes(bytes(data))
        faults["part_corrupt"] += 1


def committed_parts(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("chunk-*.part"))


def run_under_faults(
    rng: random.Random, job: Path, plan: list[str], injector: Injector, faults: Counter, deadline: float,
    not_reached: Counter,
) -> tuple[bool, list[str]]:
    """Run (and resume) the job until it finishes. Server and network faults land one after
    another while any run goes on; each run after the first takes the plan's next coordinator
    fault (kill -9 after 1-3 more chunks commit, or a crash point; the merge crash last); after
    the first kill a committed part is damaged. Returns (finished, problems seen)."""
    folder = job.parent
    log = folder / "coordinator.log"
    server_faults = [kind for kind in plan if kind in SERVER_FAULTS]
    run_faults = sorted((kind for kind in plan if kind in RUN_FAULTS), key=lambda kind: kind == "crash_merge")
    damage = "part_damage" in plan
    first = True
    while True:
        env, kill_at = {}, None
        kind = run_faults.pop(0) if run_faults else None
        if kind == "crash_part_renamed":
            env["TENSORFLEET_CRASH_AT"] = f"part_renamed:{rng.randint(1, 4)}"
        elif kind == "crash_merge":
            env["TENSORFLEET_CRASH_AT"] = f"merge:{rng.randint(1, 3)}"
        elif kind == "coordinator_kill":
            kill_at = committed_parts(folder) + rng.randint(1, 3)  # after that many more chunks commit
        process = coordinator(job, *([] if first else ["--resume"]), env=env, log=log)
        first = False
        next_fault = time.monotonic() + rng.uniform(0.2, 1.0)
        while process.poll() is None and time.monotonic() < deadline:
            if kill_at and committed_parts(folder) >= kill_at:
                process.send_signal(signal.SIGKILL)
                break
            if server_faults and time.monotonic() >= next_fault:
                injector.inject(server_faults.pop(0))
                next_fault = time.monotonic() + rng.uniform(0.1, 0.8)
            time.sleep(0.05)
        if process.poll() is None and time.monotonic() >= deadline:  # a hung job is a finding
            process.send_signal(signal.SIGKILL)
            process.wait()
            return False, [f"{folder.name}: not finished before the deadline; see {log}"]
        code = process.wait()
        if code == -signal.SIGKILL:
            faults[kind or "coordinator_kill"] += 1
            if damage:
                damage = False
                damage_a_part(rng, folder, faults)
            continue
        if code == 0:
            not_reached.update(server_faults + run_faults)  # the job finished first
            return True, []
        return False, [f"{folder.name}: exit {code}: {log.read_text()[-800:]}"]


def disk_full(rng: random.Random, work: Path, servers: list[str], data: Path) -> dict:
    """The protein job with its job folder on a 256 KiB tmpfs: exit 2, then more room, --resume,
    and the output bitwise equal to the fault-free run's."""
    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a tmpfs"}
    job = prepare(work, "disk-full", "protein", servers, data)
    point = work / "tmpfs"
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(point)], capture_output=True)
    if mounted.returncode != 0:
        return {"skipped": f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}"}
    try:
        log = job.parent / "coordinator.log"
        first = coordinator(job, "--job-dir", str(point / "job"), log=log).wait()
        said = log.read_text()
        subprocess.run(["mount", "-o", "remount,size=64m", str(point)], check=True)
        second = coordinator(job, "--job-dir", str(point / "job"), "--resume", log=log).wait()
        identical, lost = compare(work / "protein-reference", job.parent) if second == 0 else (False, -1)
        return {
            "first_exit": first, "says_resume": "--resume" in said and "no space left" in said,
            "traceback": "Traceback" in said, "resume_exit": second, "identical": identical, "rows_lost": lost,
        }
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few faults on small jobs (the smoke test, < 2 min)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--rows", type=int, default=None, help="proteins per job (default 960; --quick 24)")
    parser.add_argument("--faults", type=int, default=None, help="faults planned per job (default 10; --quick 3)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed on stderr)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    # jobs long enough that a quiet machine reaches the plans' server faults before they finish
    rows = args.rows or (24 if args.quick else 960)
    per_job = args.faults or (3 if args.quick else 10)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="tf-chaos-"))
    started = time.monotonic()
    faults: Counter = Counter()
    not_reached: Counter = Counter()
    fleet: list[Backend] = []
    record: dict = {"bench": "chaos", "seed": args.seed, "quick": args.quick, "machine": machine()}
    try:
        repository = work / "models"
        repository.mkdir()
        for name, path in MODELS.items():
            os.symlink(path, repository / name)
        data = work / "data"
        data.mkdir()
        write_fasta_subset(REPO_ROOT / "examples" / "data" / "proteins.fasta", data / "proteins.fasta", rows)
        write_fasta_subset(REPO_ROOT / "examples" / "data" / "proteins.fasta", data / "more-proteins.fasta", 3 * rows)
        for source in ("singles", "doubles"):
            write_fasta_subset(REPO_ROOT / "examples" / "epistasis" / "data" / f"{source}.fasta", data / f"{source}.fasta", rows)
        from examples.protein.fasta import read_fasta

        counts = {name: len(read_fasta(data / f"{name}.fasta")[0]) for name in ("proteins", "more-proteins", "singles", "doubles")}
        fleet = [Backend(repository) for _ in range(2)]
        direct = [b.address for b in fleet]
        proxied = [b.proxy.address for b in fleet]
        injector = Injector(rng, fleet, faults)
        results, problems = [], []
        duplicates = 0
        kinds = ["protein", "pipeline", "sweep"]
        for kind in kinds:
            reference = prepare(work, f"{kind}-reference", kind, direct, data)
            before = sum((b.computed() for b in fleet), Counter())
            code = coordinator(reference, log=reference.parent / "coordinator.log").wait()
            if code != 0:
                raise SystemExit(f"the fault-free {kind} run failed: {(reference.parent / 'coordinator.log').read_text()[-2000:]}")
            for backend in fleet:
                backend.poll()
            reference_extra = sum((b.computed() for b in fleet), Counter()) - before - expected_rows(kind, counts)
            plan = [rng.choice(SERVER_FAULTS + RUN_FAULTS) for _ in range(per_job)]
            if "coordinator_kill" not in plan:
                plan[rng.randrange(len(plan))] = "coordinator_kill"
            plan.insert(plan.index("coordinator_kill") + 1, "part_damage")
            job = prepare(work, f"{kind}-chaos", kind, proxied, data)
            before = sum((b.computed() for b in fleet), Counter())
            finished, seen = run_under_faults(
                rng, job, plan, injector, faults, time.monotonic() + (100 if args.quick else 900), not_reached
            )
            for backend in fleet:
                backend.poll()
            computed = sum((b.computed() for b in fleet), Counter()) - before
            extra = sum((computed - expected_rows(kind, counts)).values())
            duplicates += extra
            identical, lost = compare(reference.parent, job.parent) if finished else (False, sum(expected_rows(kind, counts).values()))
            problems += seen
            results.append({
                "job": kind, "finished": finished, "identical": identical, "rows_lost": lost,
                "rows_computed_more_than_once": extra, "reference_extra_rows": sum(reference_extra.values()),
                "plan": plan,
            })
        full = disk_full(rng, work, proxied, data) if not args.quick else {"skipped": "--quick"}
        if "first_exit" in full:
            faults["disk_full"] += 1
        injector.close()
        record.update({
            "faults": dict(sorted(faults.items())),
            "faults_total": sum(faults.values()),
            "faults_planned_not_reached": dict(sorted(not_reached.items())),
            "runs_finished": sum(r["finished"] for r in results),
            "runs": len(results),
            "outputs_identical": sum(r["identical"] for r in results),
            "rows_lost": sum(r["rows_lost"] for r in results),
            "rows_computed_more_than_once": duplicates,
            "disk_full": full,
            "jobs": results,
            "problems": problems,
            "seconds": round(time.monotonic() - started, 1),
        })
    finally:
        for backend in fleet:
            with contextlib.suppress(Exception):
                backend.stop()
        if args.keep:
            print(f"work folder: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    emit(record)


if __name__ == "__main__":
    main()
