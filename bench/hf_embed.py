"""ESM-2 (8M shape) through backend `transformers`, served, against the same model in-process,
and against the hand-written encoder (examples/esm2, python backend) served from the same
weights, in one run.

    python -m bench.hf_embed --tiny                  # 48 sequences of 30-200 residues (CI, seconds)
    python -m bench.hf_embed                         # 512 sequences of 50-1000 residues
    python -m bench.hf_embed --device cuda:0         # on a GPU (server and in-process alike)

The checkpoint is a random EsmModel at the 8M shape (6 layers x 320, 20 heads, fixed seed)
written by transformers' save_pretrained; nothing is downloaded. Every variant computes the
same mean-pooled embeddings:

- in-process: transformers in this process, rows sorted by length into batches within the same
  token budget, each batch padded with its attention mask (what a careful script does);
- served (transformers): one server, backend `transformers`, requests of --batch-rows rows in
  input order with --window requests in flight, through the batcher;
- served (hand-written): the same, examples/esm2's encoder reading the same checkpoint.

It prints one JSON line: rows/s of each and the ratios served/in-process and
transformers/hand-written, the largest difference between their embeddings, load and machine.
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


def build_checkpoint(folder: Path, seed: int = 0) -> Path:
    import torch
    import transformers

    vocab = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = transformers.EsmConfig(
        vocab_size=len(vocab), hidden_size=320, num_hidden_layers=6, num_attention_heads=20, intermediate_size=1280,
        max_position_embeddings=1026, pad_token_id=1, mask_token_id=32, position_embedding_type="rotary",
        token_dropout=True, emb_layer_norm_before=False,
    )
    torch.manual_seed(seed)
    transformers.EsmModel(config, add_pooling_layer=False).eval().save_pretrained(folder)
    transformers.EsmTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def sequences(count: int, shortest: int, longest: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(shortest, longest))) for _ in range(count)]


def build_repository(root: Path, checkpoint: Path, budget: int, max_rows: int) -> Path:
    import yaml

    from examples.esm2 import build

    repo = root / "models"
    build.main(["--from-hf", str(checkpoint), "--out", str(repo), "--name", "esm2_hand", "--token-budget", str(budget),
                "--max-batch-size", str(max_rows)])
    folder = repo / "esm2_hf"
    folder.mkdir(parents=True)
    doc = {
        "name": "esm2_hf", "backend": "transformers", "max_batch_size": max_rows,
        "transformers": {"path": str(checkpoint), "max_length": 1024},
        "inputs": [{"name": "sequence", "datatype": "BYTES", "shape": []}],
        "outputs": [{"name": "mean", "datatype": "FP32", "shape": [320]}],
        "batching": {"max_queue_delay_ms": 2, "token_budget": budget, "length_bucket": 32},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return repo


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

    def run_all() -> None:
        for group in groups:
            encoded = tokenizer([rows[i] for i in group], padding=True, return_special_tokens_mask=True,
                                return_tensors="pt")
            real = ((encoded["attention_mask"] == 1) & (encoded["special_tokens_mask"] == 0)).float().to(device)
            with torch.inference_mode():
                hidden = model(input_ids=encoded["input_ids"].to(device),
                               attention_mask=encoded["attention_mask"].to(device)).last_hidden_state
                mean = (hidden * real.unsqueeze(-1)).sum(dim=1) / real.sum(dim=1, keepdim=True)
            out[group] = mean.cpu().numpy()

    run_all()  # warm
    started = time.perf_counter()
    run_all()
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
    parser.add_argument("--tiny", action="store_true", help="48 short sequences: a smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-rows", type=int, default=32)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--token-budget", type=int, default=16384)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rows = sequences(48, 30, 200) if args.tiny else sequences(512, 50, 1000)
    with tempfile.TemporaryDirectory(prefix="tf-bench-hf-") as tmp:
        root = Path(tmp)
        checkpoint = build_checkpoint(root / "esm2_8M")
        repo = build_repository(root, checkpoint, args.token_budget, max(args.batch_rows, 64))
        local_s, local = in_process(checkpoint, rows, args.token_budget, args.device)
        with server_process(repo, "--device", args.device, threads=args.threads) as server:
            hf_s, hf = served(server.address, "esm2_hf", rows, args.batch_rows, args.window)
            hand_s, hand = served(server.address, "esm2_hand", rows, args.batch_rows, args.window)
    tokens = sum(len(r) + 2 for r in rows)
    emit({
        "bench": "hf_embed", "model": "ESM-2 8M shape (6 x 320), random weights", "size": "tiny" if args.tiny else
        "standard", "rows": len(rows), "tokens": tokens, "device": args.device, "threads": args.threads,
        "in_process_rows_s": round(len(rows) / local_s, 1),
        "served_transformers_rows_s": round(len(rows) / hf_s, 1),
        "served_handwritten_rows_s": round(len(rows) / hand_s, 1),
        "served_transformers_over_in_process": round(local_s / hf_s, 3),
        "served_transformers_over_handwritten": round(hand_s / hf_s, 3),
        "max_abs_diff_transformers_vs_in_process": float(np.abs(hf - local).max()),
        "max_abs_diff_transformers_vs_handwritten": float(np.abs(hf - hand).max()),
        "load": os.getloadavg()[0], "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
