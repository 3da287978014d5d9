"""Coordinator overhead: the same model and rows three ways, in one run, with ratios.

1. in-process: the model class called in a loop on the planned requests (no gRPC);
2. SDK streaming: InferenceClient.stream to one server, the same requests, window 4;
3. full job: `tensorfleet run` (plan, dispatch, part files, manifest, merge) on that server.

    .venv/bin/python bench/coordinator.py [--model protein_embedder|cell_embedder] [--rows N]

Each side gets one CPU thread for the model (the server is started with --threads 1), so on
a 2-core machine the coordinator or client has the other core. All three run the same
requests: the plan's (under a token budget, each chunk's rows sorted by length). This
process gets the same allocator tuning as the server (`services/allocator.py`), so the
in-process loop is not slowed by page faults the server avoids. Prints rows/s and the ratios
against the in-process loop; the target is full job >= 0.90 of in-process on CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from tensorfleet.services.allocator import tune_allocator  # noqa: E402

tune_allocator()  # before numpy/torch allocate: the in-process loop gets what the server gets

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.protein.inprocess import load_python_model  # noqa: E402
from tensorfleet.client import InferenceClient  # noqa: E402
from tensorfleet.coordinator.engine.planner import make_plan  # noqa: E402
from tensorfleet.coordinator.engine.source import EXCLUSIVE, RequestSource  # noqa: E402
from tensorfleet.coordinator.io.readers import open_reader  # noqa: E402
from tensorfleet.coordinator.spec import InputSpec  # noqa: E402
from tensorfleet.core.process import server_command, start_and_wait  # noqa: E402

CASES = {
    "protein_embedder": {"repository": ROOT / "examples" / "models", "input": "sequence", "field": "sequence"},
    "cell_embedder": {"repository": ROOT / "examples" / "jobs" / "models", "input": "counts", "field": "X"},
}


def prepare_input(model: str, rows: int, folder: Path) -> Path:
    if model == "protein_embedder":
        path = folder / "proteins.fasta"
        with open(ROOT / "examples" / "data" / "proteins.fasta") as source, open(path, "w") as target:
            seen = 0
            for line in source:
                if line.startswith(">"):
                    seen += 1
                    if seen > rows:
                        break
                target.write(line)
        return path
    sys.path.insert(0, str(ROOT / "examples" / "jobs"))
    from make_h5ad import make_cells

    path = folder / "cells.h5ad"
    make_cells(rows).write_h5ad(path)
    return path


def start_server(repository: Path, model: str, folder: Path) -> tuple[subprocess.Popen, str]:
    command = server_command("--model-repository", str(repository), "--model", model, "--host", "127.0.0.1",
                             "--threads", "1", port_file=folder / "port")
    process, port = start_and_wait(command, folder / "port", folder / "server.log", 300)
    return process, f"127.0.0.1:{port}"


def in_input_order(pieces: list[np.ndarray], requests: list[np.ndarray]) -> np.ndarray:
    rows = np.concatenate(requests)
    out = np.empty((len(rows), *pieces[0].shape[1:]), dtype=pieces[0].dtype)
    out[rows] = np.concatenate(pieces)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CASES), default="protein_embedder")
    parser.add_argument("--rows", type=int, default=None, help="default: 256 proteins or 20000 cells")
    parser.add_argument("--chunk-rows", type=int, default=None)
    args = parser.parse_args()
    case = CASES[args.model]
    rows = args.rows or (256 if args.model == "protein_embedder" else 20000)
    model_dir = case["repository"] / args.model
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    batch_rows = min(int(config["max_batch_size"]), 64)
    token_budget = int((config.get("batching") or {}).get("token_budget", 0)) or None
    chunk_rows = args.chunk_rows or (64 if args.model == "protein_embedder" else 2048)

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp:
        folder = Path(tmp)
        path = prepare_input(args.model, rows, folder)
        spec = InputSpec(path=str(path))
        reader = open_reader(spec)
        fields = {case["input"]: case["field"]}
        plan = make_plan(reader, fields, batch_rows=batch_rows, chunk_rows=chunk_rows, token_budget=token_budget)
        requests = [rows for chunk in plan.chunks for rows in chunk.request_rows()]
        datatype = config["inputs"][0]["datatype"]
        source = RequestSource(reader, fields, {case["input"]: datatype}, args.model)
        print(f"model {args.model}: {plan.settings.rows} rows in {len(requests)} requests "
              f"(<= {batch_rows} rows{f', {token_budget} tokens' if token_budget else ''} each), {len(plan.chunks)} chunks")

        model = load_python_model(model_dir)
        model.predict(source.inputs_at(requests[0]))

        def run_inprocess() -> tuple[float, np.ndarray]:
            started = time.perf_counter()
            local = [model.predict(source.inputs_at(rows))["embedding"] for rows in requests]
            return time.perf_counter() - started, in_input_order(local, requests)

        first_inprocess_s, local_out = run_inprocess()

        server, address = start_server(case["repository"], args.model, folder)
        try:
            with InferenceClient(address) as client:
                client.infer(args.model, source.inputs_at(requests[0]), parameters={EXCLUSIVE: True})
                started = time.perf_counter()
                streamed = list(
                    client.stream(args.model, (source.inputs_at(rows) for rows in requests), window=4,
                                  parameters={EXCLUSIVE: True})
                )
                stream_s = time.perf_counter() - started
            stream_out = in_input_order([item["embedding"] for item in streamed], requests)

            job = folder / "job.yaml"
            job.write_text(yaml.safe_dump({
                "name": "bench", "input": {"path": str(path), "tensors": fields},
                "model": {"name": args.model, "servers": [address]},
                "output": {"path": str(folder / "out.h5")},
                "chunking": {"chunk_rows": chunk_rows, "batch_rows": batch_rows},
                "policy": {"window": 4},
            }))
            started = time.perf_counter()
            run = subprocess.run([sys.executable, "-m", "tensorfleet.coordinator", "run", str(job)],
                                 capture_output=True, text=True)
            job_s = time.perf_counter() - started
            if run.returncode != 0:
                raise SystemExit(f"tensorfleet run failed:\n{run.stderr}")
            dispatch_s = float(re.search(r"computed in ([0-9.]+)s", run.stdout).group(1))
            with h5py.File(folder / "out.h5") as f:
                job_out = f["embedding"][:]
            # in-process again after the served runs (the server idles): drift hits both sides
            last_inprocess_s, _ = run_inprocess()
            inprocess_s = (first_inprocess_s + last_inprocess_s) / 2
        finally:
            server.terminate()
            server.wait(30)

    rate = {name: plan.settings.rows / seconds for name, seconds in
            [("in-process", inprocess_s), ("SDK stream", stream_s), ("job dispatch", dispatch_s), ("job end-to-end", job_s)]}
    base = rate["in-process"]
    print(f"{'way':<16}{'seconds':>9}{'rows/s':>10}{'vs in-process':>15}")
    for name, seconds in [("in-process", inprocess_s), ("SDK stream", stream_s), ("job dispatch", dispatch_s),
                          ("job end-to-end", job_s)]:
        print(f"{name:<16}{seconds:>9.2f}{rate[name]:>10.1f}{rate[name] / base:>15.3f}")
    print(f"in-process runs (before, after the served ones): {first_inprocess_s:.2f}s, {last_inprocess_s:.2f}s")
    print("job dispatch: plan -> all chunks committed; end-to-end: the whole `tensorfleet run` process "
          "(interpreter start, input checksum, plan, merge included)")
    print(f"bitwise equal to in-process: SDK stream {np.array_equal(stream_out, local_out)}, "
          f"full job {np.array_equal(job_out, local_out)}")


if __name__ == "__main__":
    main()
