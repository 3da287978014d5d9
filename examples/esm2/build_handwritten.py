"""The hand-written alternative: `build.py --backend python` serves examples/esm2's own encoder.

`esm2.py` (the encoder), `model.py` (the python-backend model) and `checkpoint.py` (a Hugging
Face ESM-2 folder read without transformers, `gamma`/`beta` LayerNorm names included) are kept
only because they measured faster than backend `transformers` on the CPU (docs/performance.md,
"transformers ESM-2": transformers' ESM computes GELU as five separate tensor operations). The
outputs are the same as the default build's (`mean`, `per_token`, `length`) within 1e-5, so
one job file runs either. The model folder holds config.yaml, model.py, esm2.py, esm2.json (the
shape) and weights.pt (ESM-2 names), each pinned by sha256.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

from tensorfleet.core.hashing import file_sha256

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from examples.esm2.checkpoint import load_hf_checkpoint  # noqa: E402
from examples.esm2.esm2 import ESM2Config, build_random  # noqa: E402


def build_python(args: argparse.Namespace) -> Path:
    """Write `args.out/args.name` serving the hand-written encoder (python backend)."""
    if args.from_hf:
        model = load_hf_checkpoint(args.from_hf)
        source = f"weights from the Hugging Face checkpoint {args.from_hf.name}"
    else:
        config = ESM2Config.shape(args.shape)
        overrides = {k: v for k, v in (("layers", args.layers), ("dim", args.dim), ("heads", args.heads)) if v}
        if "dim" in overrides:
            overrides["ffn"] = 4 * overrides["dim"]
        model = build_random(dataclasses.replace(config, **overrides), args.seed)
        source = f"fixed-seed random weights (seed {args.seed})"
    config = model.config
    target = args.out / args.name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copyfile(HERE / "model.py", target / "model.py")
    shutil.copyfile(HERE / "esm2.py", target / "esm2.py")
    (target / "esm2.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, target / "weights.pt")
    params = sum(p.numel() for p in model.parameters())
    doc = {
        "name": args.name,
        "backend": "python",
        "version": "1",
        "description": f"ESM-2 encoder (hand-written), {config.layers} layers x {config.dim} ({config.heads} heads), "
        f"{params / 1e6:.1f}M parameters, {source}.",
        "max_batch_size": args.max_batch_size,
        "inputs": [{"name": "sequence", "datatype": "BYTES", "shape": [], "max_length": args.max_length}],
        "outputs": [
            {"name": "mean", "datatype": "FP32", "shape": [config.dim]},
            {"name": "per_token", "datatype": args.per_residue_dtype, "shape": [-1, config.dim], "ragged": True},
            {"name": "length", "datatype": "INT32", "shape": []},
        ],
        "batching": {
            "max_queue_delay_ms": 2, "preferred_batch_sizes": [b for b in (16, 32, 64) if b <= args.max_batch_size],
            "max_queue_size": 1024, "token_budget": args.token_budget, "length_bucket": 32,
        },
        "precision": args.precision,
        "artifacts": {name: file_sha256(target / name) for name in ("model.py", "esm2.py", "esm2.json", "weights.pt")},
        "parameters": {"max_length": args.max_length, "over_length": args.over_length},
        "warmup": [{"sequence": "MKTAYIAKQR"[: args.max_length]}],
    }
    header = "# Written by examples/esm2/build.py --backend python; rebuild rather than edit (the checksums must match).\n"
    (target / "config.yaml").write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return target
