"""ESM-2 (8M shape) served through backend `transformers` (the examples/esm2 model) against the
same model in-process, and against the hand-written encoder (`build.py --backend python`)
served from the same weights, as ratios in one run.

    python -m bench.hf_embed --tiny                  # 48 sequences of 30-200 residues (CI, seconds)
    python -m bench.hf_embed                         # 256 sequences of 50-1000 residues (<= 10 min, 2 cores)
    python -m bench.hf_embed --device cuda:0         # on a GPU (server and in-process alike)

The model folder is what `examples/esm2/build.py --shape 8M` writes: a random EsmModel (6 layers
x 320, 20 heads, fixed seed) saved by transformers' save_pretrained, served with no code of ours;
nothing is downloaded. Both variants compute the same mean-pooled embeddings:

- in-process: transformers in this process, rows sorted by length into batches within the same
  token budget, each batch padded with its attention mask (what a careful script does);
- served: one server, requests of --batch-rows rows in input order with --window requests in
  flight, through the batcher;
- served (hand-written): the same server, examples/esm2's own encoder reading the same checkpoint.

It prints one JSON line: rows/s of each, the ratios served/in-process and transformers/hand-written
(above 1: the first is faster), the largest differences between the embeddings, load and machine.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import emit, machine, server_process

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LETTERS = "ACDEFGHIKLMNPQRSTVWY"


def sequences(count: int, shortest: int, longest: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(shortest, longest))) for _ in range(count)]


def build_repository(root: Path, budget: int, max_rows: int) -> tuple[Path, Path]:
    """examples/esm2's model folder at the 8M shape (`esm2`), and the hand-written encoder on the
    same weights (`esm2_hand`); (the repository, the checkpoint both serve)."""
    from examples.esm2 import build

    repo = root / "models"
    common = ["--out", str(repo), "--token-budget", str(budget), "--max-batch-size", str(max_rows)]
    checkpoint = repo / "esm2" / "checkpoint"
    for args in (["--shape", "8M", "--name", "esm2"], ["--backend", "python", "--from-hf", str(checkpoint),
                                                       "--name", "esm2_hand"]):
        build.build(build.parse_args([*args, *common]))  # not main(): stdout carries only the JSON line
    return repo, checkpoint


def in_process(checkpoint: Path, rows: list[str], budget: int, device: str) -> tuple[float, np.ndarray]:
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(str(checkpoint)).to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    groups, group = [], []
    for index in order:
        if group and (len(group) + 1) * (len(rows[index]) + 2) > budget:
            groups.append(group)
            group = []
        group.append(index)
    groups.append(group)
    out = np.zeros((len(rows), 320), dtype=np.float32)

    def run_all(batches: list[list[int]]) -> None:
        for group in batches:
            encoded = tokenizer([rows[i] for i in group], padding=True, return_special_tokens_mask=True,
                                return_tensors="pt")
            real = ((encoded["attention_mask"] == 1) & (encoded["special_tokens_mask"] == 0)).float().to(device)
            with torch.inference_mode():
                hidden = model(input_ids=encoded["input_ids"].to(device),
                               attention_mask=encoded["attention_mask"].to(device)).last_hidden_state
                mean = (hidden * real.unsqueeze(-1)).sum(dim=1) / real.sum(dim=1, keepdim=True)
            out[group] = mean.cpu().numpy()

    run_all(groups[:1] + groups[-1:])  # warm: the shortest and the longest shapes
    started = time.perf_counter()
    run_all(groups)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


def served(address: str, model: str, rows: list[str], batch_rows: int, window: int) -> tuple[float, np.ndarray]:
    from tensorfleet.client import InferenceClient

    batches = [rows[i:i + batch_rows] for i in range(0, len(rows), batch_rows)]
    with InferenceClient(address, timeout=600) as client:
        client.infer(model, {"sequence": batches[0]}, outputs=["mean"])  # warm
        started = time.perf_counter()
        with ThreadPoolExecutor(window) as pool:
            results = list(pool.map(lambda b: client.infer(model, {"sequence": b}, outputs=["mean"])["mean"], batches))
        seconds = time.perf_counter() - started
    return seconds, np.concatenate(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", "--quick", action="store_true", help="48 short sequences: a smoke run")
    parser.add_argument("--rows", type=int, help="how many sequences (default: 48 tiny, 256 standard)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-rows", type=int, default=32)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--token-budget", type=int, default=16384)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    shortest, longest = (30, 200) if args.tiny else (50, 1000)
    rows = sequences(args.rows or (48 if args.tiny else 256), shortest, longest)
    with tempfile.TemporaryDirectory(prefix="tf-bench-hf-") as tmp:
        repo, checkpoint = build_repository(Path(tmp), args.token_budget, max(args.batch_rows, 64))
        local_s, local = in_process(checkpoint, rows, args.token_budget, args.device)
        with server_process(repo, "--device", args.device, threads=args.threads) as server:
            served_s, remote = served(server.address, "esm2", rows, args.batch_rows, args.window)
            hand_s, hand = served(server.address, "esm2_hand", rows, args.batch_rows, args.window)
    emit({
        "bench": "hf_embed", "model": "ESM-2 8M shape (6 x 320), random weights, examples/esm2 (backend transformers)",
        "size": "tiny" if args.tiny else "standard", "rows": len(rows), "residues": f"{shortest}-{longest}",
        "tokens": sum(len(r) + 2 for r in rows), "device": args.device, "threads": args.threads,
        "in_process_rows_s": round(len(rows) / local_s, 1),
        "served_rows_s": round(len(rows) / served_s, 1),
        "served_handwritten_rows_s": round(len(rows) / hand_s, 1),
        "ratio_served_over_in_process": round(local_s / served_s, 3),
        "ratio_transformers_over_handwritten": round(hand_s / served_s, 3),
        "max_abs_diff_served_vs_in_process": float(np.abs(remote - local).max()),
        "max_abs_diff_transformers_vs_handwritten": float(np.abs(remote - hand).max()),
        "load": os.getloadavg()[0], "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
