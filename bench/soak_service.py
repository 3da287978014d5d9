"""Soak of the coordinator service: many small jobs submitted, about half cancelled at random
moments, the service killed -9 and restarted midway; then every job's state is checked against
its job folder, no model server may outlive its job, and the state folder must stay bounded
(--keep-finished).

Jobs: 40 FASTA rows of the test embedder each; most use one shared server (model.servers),
one in five its own local fleet (model.local, one server) so that server processes per job can
be checked. Run: python -m bench.soak_service [--minutes 10] [--quick]; prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

from bench.common import REPO_ROOT, emit, launch_server, machine
from tensorfleet.client.coordinator_client import job_state
from tensorfleet.coordinator.service.grpc_service import STORE_NAME
from tests.coordinator.helpers import make_fasta
from tests.coordinator.service.helpers import start_coordinator

MODELS = REPO_ROOT / "tests" / "coordinator" / "models"
KEEP = 40


def write_job(folder: Path, server: str, local: bool, seed: int) -> Path:
    folder.mkdir(parents=True)
    make_fasta(folder / "in.fasta", 40, seed=seed)
    model = {"name": "embed", "local": {"repository": str(MODELS), "count": 1}} if local else {"name": "embed", "servers": [server]}
    spec = {
        "name": folder.name, "input": {"path": "in.fasta"}, "model": model, "output": {"path": "out.h5"},
        "chunking": {"chunk_rows": 8, "batch_rows": 4}, "policy": {"window": 2},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    return folder / "job.yaml"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return "zombie" not in next(line for line in handle if line.startswith("State:"))
    except (FileNotFoundError, StopIteration):
        return False


def folder_state(folder: Path) -> tuple[int, int, bool]:
    """(chunks, chunks done, output present) of a job folder."""
    manifest = folder / "out.h5.tfjob" / "manifest.sqlite"
    chunks = done = 0
    if manifest.exists():
        with contextlib.closing(sqlite3.connect(f"file:{manifest}?mode=ro", uri=True, timeout=10)) as db:
            chunks, done = db.execute("SELECT COUNT(*), COALESCE(SUM(done), 0) FROM chunks").fetchone()
    return chunks, done, (folder / "out.h5").exists()


def sizes_of(state: Path) -> dict[str, int]:
    """Bytes under the state folder by part: the service logs the harness writes there, the
    job store (SQLite and its WAL), the per-job folders, and anything else. Files the service
    removes meanwhile (retention) are skipped."""
    parts = {"logs": 0, "store": 0, "jobs": 0, "other": 0}
    for folder, _, files in os.walk(state):
        relative = Path(folder).relative_to(state)
        for name in files:
            try:
                size = os.stat(os.path.join(folder, name)).st_size
            except OSError:
                continue
            if relative.parts[:1] == ("jobs",):
                parts["jobs"] += size
            elif name.startswith(STORE_NAME):
                parts["store"] += size
            elif name.endswith(".log"):
                parts["logs"] += size
            else:
                parts["other"] += size
    return parts


def job_folders(state: Path) -> int:
    with contextlib.suppress(OSError):
        return len(os.listdir(state / "jobs"))
    return 0


def growth_by_part(samples: list[tuple[float, dict[str, int], int]]) -> dict[str, dict[str, float]]:
    """Each part's bytes after warm-up (the first fifth) and at the end, and its growth: which
    part, if any, keeps growing."""
    if not samples:
        return {}
    warm = samples[len(samples) // 5][1]
    last = samples[-1][1]
    return {
        part: {"after_warmup": warm[part], "end": last[part], "growth": round(last[part] / warm[part] - 1, 3) if warm[part] else None}
        for part in last
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="one minute")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    seconds = 60.0 if args.quick else args.minutes * 60
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="tf-soak-service-"))
    state = work / "state"
    server = launch_server(MODELS)
    service = None
    jobs: dict[str, Path] = {}
    local: set[str] = set()
    cancel_at: dict[str, float] = {}
    counts: Counter = Counter()
    state_sizes: list[tuple[float, dict[str, int], int]] = []
    problems: list[str] = []
    started = time.monotonic()
    try:
        roots = ("--data-root", str(work), "--output-root", str(work), "--model-root", str(MODELS))
        service = start_coordinator(state, "--max-jobs", "2", "--keep-finished", str(KEEP), *roots)
        killed = False
        client = service.client()
        while time.monotonic() - started < seconds:
            now = time.monotonic()
            if not killed and now - started > seconds / 2:
                client.close()
                service.stop(signal.SIGKILL)
                counts["service_kill"] += 1
                service = start_coordinator(state, "--max-jobs", "2", "--keep-finished", str(KEEP), *roots)
                client = service.client()
                killed = True
            if len(client.jobs(["QUEUED"])) < 4:
                index = len(jobs)
                is_local = rng.random() < 0.2
                job = write_job(work / f"job{index:04d}", server.address, is_local, seed=index)
                submitted = client.submit(job)
                jobs[submitted.job_id] = job.parent
                if is_local:
                    local.add(submitted.job_id)
                if rng.random() < 0.5:
                    cancel_at[submitted.job_id] = now + rng.uniform(0.0, 8.0)
            for job_id, when in list(cancel_at.items()):
                if now >= when:
                    with contextlib.suppress(Exception):
                        client.cancel(job_id)
                        counts["cancel_requests"] += 1
                    del cancel_at[job_id]
            state_sizes.append((round(now - started, 1), sizes_of(state), job_folders(state)))
            time.sleep(0.2)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if not client.jobs(["QUEUED", "RUNNING"]):
                break
            time.sleep(1)
        listed = {job.job_id: job_state(job) for job in client.jobs()}
        client.close()
        time.sleep(3)
        for job_id, folder in jobs.items():
            state_now = listed.get(job_id, "FORGOTTEN")
            counts[state_now] += 1
            chunks, done, output = folder_state(folder)
            if state_now == "SUCCEEDED" and not (output and chunks and done == chunks):
                problems.append(f"{job_id}: SUCCEEDED but {done}/{chunks} chunks, output {output}")
            if state_now in ("CANCELLED", "FAILED") and output and done < chunks:
                problems.append(f"{job_id}: {state_now} with an output but {done}/{chunks} chunks")
            if state_now in ("QUEUED", "RUNNING"):
                problems.append(f"{job_id}: still {state_now} at the end")
            if job_id in local:
                servers_file = folder / "out.h5.tfjob" / "servers" / "servers.json"
                if servers_file.exists():
                    pids = [entry["pid"] for entry in json.loads(servers_file.read_text())]
                    counts["local_servers_checked"] += len(pids)
                    outlived = [pid for pid in pids if alive(pid)]
                    if outlived:
                        problems.append(f"{job_id} ({state_now}): server pids {outlived} outlived the job")
                        counts["servers_outliving"] += len(outlived)
    finally:
        if service is not None:
            service.stop(signal.SIGKILL)
        server.stop(signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
    emit({
        "bench": "soak_service",
        "machine": machine(),
        "seconds": round(seconds),
        "jobs_submitted": len(jobs),
        "jobs_local_fleet": len(local),
        "final_states": {k: v for k, v in counts.items() if k.isupper()},
        "service_kills": counts["service_kill"],
        "cancel_requests": counts["cancel_requests"],
        "local_servers_checked": counts["local_servers_checked"],
        "servers_outliving_their_job": counts["servers_outliving"],
        "inconsistent_jobs": len(problems),
        "problems": problems[:10],
        "keep_finished": KEEP,
        "state_dir_bytes_max": max((sum(s[1].values()) for s in state_sizes), default=0),
        "state_job_folders_max": max((s[2] for s in state_sizes), default=0),
        "state_dir_bytes": [sum(s[1].values()) for s in state_sizes[:: max(1, len(state_sizes) // 20)]],
        "state_dir_parts": growth_by_part(state_sizes),
        "seconds_total": round(time.monotonic() - started, 1),
    })


if __name__ == "__main__":
    main()
