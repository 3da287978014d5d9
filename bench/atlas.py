"""Single cells at atlas scale: an anndata-written CSR .h5ad through the example cell job vs an in-process loop.

(a) in-process: anndata backed reads of `chunk_rows`-row blocks of X, the model's own
    `predict` on `batch_rows`-row slices of each block (dense rows, or CSR rows where the
    model declares `sparse: csr` on its input), embeddings stacked in row order;
(b) tensorfleet: `examples/jobs/cell-embeddings.yaml` (its `cell_embedder`, 2 local servers)
    pointed at the same file: `tensorfleet run` as a subprocess.

`ratio` = the job's `speed:` rows/s (dispatch only: start-up, planning and the output copy are
left out) / in-process rows/s. Also printed: the coordinator's own CPU seconds per row (its
process alone, from /proc, the servers excluded), its peak RSS, and the payload bytes sent
per row (tensor bytes of every request, as the coordinator builds them). The job's output
(obsm) is compared with the in-process embeddings bit for bit.

    python -m bench.atlas                          # 200,000 cells x 2,000 genes, 5% non-zero
    python -m bench.atlas --cells 20000            # quicker
    python -m bench.atlas --wide                   # 20,000 genes (default 20,000 cells): memory
    python -m bench.atlas --dense-model            # the model without `sparse: csr` (dense rows)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import yaml

from bench.common import REPO_ROOT, emit, machine
from bench.fleet import speed_line, tensorfleet_command

EXAMPLE_JOB = REPO_ROOT / "examples" / "jobs" / "cell-embeddings.yaml"
EXAMPLE_MODEL = REPO_ROOT / "examples" / "jobs" / "models" / "cell_embedder"
_TICK = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=None, help="default 200,000 (20,000 with --wide)")
    parser.add_argument("--genes", type=int, default=None, help="default 2,000 (20,000 with --wide)")
    parser.add_argument("--wide", action="store_true", help="the 20,000-gene mode")
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--dense-model", action="store_true", help="the model takes dense rows (no sparse: csr)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the file here (reused when it exists)")
    args = parser.parse_args(argv)
    args.cells = args.cells or (20_000 if args.wide else 200_000)
    args.genes = args.genes or (20_000 if args.wide else 2_000)
    return args


def write_cells(path: Path, cells: int, genes: int, density: float, seed: int = 0) -> None:
    """CSR counts written by anndata itself (its own encoding), obs names cell-000000..."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    per_row = rng.binomial(genes, density, cells)
    rows = np.repeat(np.arange(cells, dtype=np.int64), per_row)
    keys = np.unique(rows * genes + rng.integers(0, genes, len(rows)))  # sorted, duplicates merged
    row_of, column = np.divmod(keys, genes)
    values = (rng.poisson(2.0, len(keys)) + 1).astype(np.float32)
    indptr = np.zeros(cells + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=cells), out=indptr[1:])
    counts = sp.csr_matrix((values, column.astype(np.int32), indptr), shape=(cells, genes))
    obs = pd.DataFrame(index=[f"cell-{i:06d}" for i in range(cells)])
    var = pd.DataFrame(index=[f"GENE{i:05d}" for i in range(genes)])
    anndata.AnnData(X=counts, obs=obs, var=var).write_h5ad(path)


def model_repository(target: Path, genes: int, sparse: bool) -> Path:
    """The example's cell_embedder, its input widened to `genes` and sparse or dense as asked."""
    folder = target / "cell_embedder"
    shutil.copytree(EXAMPLE_MODEL, folder, dirs_exist_ok=True)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["inputs"][0]["shape"] = [genes]
    if sparse:
        config["inputs"][0]["sparse"] = "csr"
    else:
        config["inputs"][0].pop("sparse", None)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def load_model(repository: Path) -> tuple[object, dict]:
    config = yaml.safe_load((repository / "cell_embedder" / "config.yaml").read_text())
    spec = importlib.util.spec_from_file_location("atlas_cell_embedder", repository / "cell_embedder" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tensor = lambda t: SimpleNamespace(name=t["name"], shape=t["shape"], sparse=t.get("sparse"))  # noqa: E731
    context = SimpleNamespace(config=SimpleNamespace(
        inputs=[tensor(t) for t in config["inputs"]], outputs=[tensor(t) for t in config["outputs"]],
    ))
    model = module.Model()
    model.load(context)
    return model, config


def run_inprocess(path: Path, repository: Path, chunk_rows: int, batch_rows: int) -> tuple[float, np.ndarray]:
    """Seconds and embeddings: backed reads of chunk_rows-row blocks, predict on batch_rows slices."""
    import anndata

    model, config = load_model(repository)
    sparse = config["inputs"][0].get("sparse") == "csr"
    started = time.perf_counter()
    adata = anndata.read_h5ad(path, backed="r")
    pieces = []
    for start in range(0, adata.n_obs, chunk_rows):
        block = adata.X[start : min(start + chunk_rows, adata.n_obs)]
        for first in range(0, block.shape[0], batch_rows):
            rows = block[first : first + batch_rows]
            counts = rows if sparse else np.asarray(rows.toarray(), dtype=np.float32)
            pieces.append(model.predict({"counts": counts})["embedding"])
    adata.file.close()
    return time.perf_counter() - started, np.concatenate(pieces)


def _cpu_and_peak(pid: int) -> tuple[float, int]:
    """The process's own CPU seconds (children excluded) and its peak RSS in bytes."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / _TICK
    peak = 0
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cpu, peak


def compile_sources() -> None:
    """Byte-compile the checkout's packages, as an install has them: with PYTHONDONTWRITEBYTECODE
    set (as on shared build machines) every run would otherwise compile them again, and that
    would count as the coordinator's start-up CPU."""
    import compileall

    for folder in ("coordinator", "core", "client", "protos"):
        compileall.compile_dir(str(REPO_ROOT / folder), quiet=1)


def run_job(path: Path, repository: Path, workdir: Path) -> dict:
    spec = yaml.safe_load(EXAMPLE_JOB.read_text())
    output = workdir / "cells.embedded.h5ad"
    spec["input"]["path"] = str(path)
    spec["model"]["local"]["repository"] = str(repository)
    spec["output"]["path"] = str(output)
    job = workdir / "cell-embeddings.yaml"
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.rmtree(workdir / "cell-embeddings.job", ignore_errors=True)
    log = workdir / "job.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            tensorfleet_command("run", str(job), "--job-dir", str(workdir / "cell-embeddings.job")),
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
        )
        cpu, peak = 0.0, 0  # the last reading before exit; the highest peak seen
        samples: list[tuple[float, float]] = []  # (time.time(), CPU seconds so far)
        while process.poll() is None:
            try:
                cpu, now = _cpu_and_peak(process.pid)
                peak = max(peak, now)
                samples.append((time.time(), cpu))
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.05)
    text = log.read_text()
    if process.returncode != 0:
        raise RuntimeError(f"tensorfleet run exited {process.returncode}:\n{text[-4000:]}")
    speed = speed_line(text)
    if speed is None:
        raise RuntimeError(f"no speed: line in the job's output:\n{text[-4000:]}")
    with h5py.File(output, "r") as handle:
        embeddings = handle["obsm"]["X_cell_embedder"][:]
    return {"rows": speed[0], "seconds": speed[1], "cpu_s": cpu, "peak_rss": peak, "embeddings": embeddings,
            "dispatch_cpu_s": dispatch_cpu(workdir / "cell-embeddings.job", samples)}


def dispatch_cpu(job_dir: Path, samples: list[tuple[float, float]]) -> float:
    """The coordinator's CPU seconds from its first lease to its last commit (the manifest's
    times): dispatch alone, without interpreter start-up, planning, merge and the output copy."""
    import sqlite3

    db = sqlite3.connect(job_dir / "manifest.sqlite")
    try:
        first = db.execute("SELECT MIN(at) FROM leases").fetchone()[0]
        last = db.execute("SELECT MAX(committed_at) FROM chunks").fetchone()[0]
    finally:
        db.close()
    if first is None or last is None or not samples:
        return float("nan")
    times = np.array([t for t, _ in samples])
    cpus = np.array([c for _, c in samples])
    return float(np.interp(last, times, cpus) - np.interp(first, times, cpus))


def payload_bytes_per_row(path: Path, sparse: bool, genes: int) -> float:
    """Tensor bytes a request carries per row: dense float32 rows, or CSR's three tensors
    (float32 values, int32 column indices, int64 row offsets: docs/protocol.md)."""
    with h5py.File(path, "r") as handle:
        cells = len(handle["X"]["indptr"]) - 1
        nnz = int(handle["X"]["indptr"][-1])
    if not sparse:
        return 4.0 * genes
    return (8.0 * nnz + 8.0 * cells) / cells  # the +1 offset per request is left out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tf-atlas-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        path = workdir / f"cells-{args.cells}x{args.genes}.h5ad"
        if not path.exists():
            write_cells(path, args.cells, args.genes, args.density)
        sparse = not args.dense_model
        repository = model_repository(workdir / "models", args.genes, sparse)
        spec = yaml.safe_load(EXAMPLE_JOB.read_text())
        chunk_rows, batch_rows = spec["chunking"]["chunk_rows"], spec["chunking"]["batch_rows"]
        inprocess_s, expected = run_inprocess(path, repository, chunk_rows, batch_rows)
        compile_sources()
        served = run_job(path, repository, workdir)
        identical = served["embeddings"].shape == expected.shape and bool(
            np.array_equal(served["embeddings"].view(np.uint32), expected.view(np.uint32))
        )
        inprocess_rate = args.cells / inprocess_s
        served_rate = served["rows"] / served["seconds"]
        emit({
            "bench": "atlas",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "load": os.getloadavg()[0],
            "cells": args.cells,
            "genes": args.genes,
            "path": "sparse" if sparse else "dense",
            "inprocess_rows_per_s": round(inprocess_rate, 1),
            "served_rows_per_s": round(served_rate, 1),
            "ratio": round(served_rate / inprocess_rate, 3),
            "coordinator_cpu_us_per_row": round(served["cpu_s"] / args.cells * 1e6, 2),
            "coordinator_dispatch_cpu_us_per_row": round(served["dispatch_cpu_s"] / args.cells * 1e6, 2),
            "coordinator_peak_rss_mb": round(served["peak_rss"] / 2**20, 1),
            "input_file_mb": round(path.stat().st_size / 2**20, 1),
            "payload_bytes_per_row": round(payload_bytes_per_row(path, sparse, args.genes), 1),
            "identical": identical,
        })
        return 0 if identical else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
