"""Build an ESM-2 embedder model folder (python backend) at a chosen shape.

    python examples/esm2/build.py --shape 8M [--seed 0] [--out examples/esm2/models]
    python examples/esm2/build.py --from-hf /path/to/esm2_t33_650M_UR50D --precision bf16

Without `--from-hf` the weights are random from `--seed` (no download: the same seed and
shape always give the same folder). With it, the weights come from a local Hugging Face
ESM-2 checkpoint folder and the shape from its config.json. The folder holds `config.yaml`,
`model.py`, `esm2.py` (the encoder), `esm2.json` (its shape) and `weights.pt` (ESM-2 names);
config.yaml lists each file's sha256, so a changed file is a clear load error.
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
from examples.esm2.esm2 import MAX_RESIDUES, SHAPES, ESM2Config, build_random  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "models", help="model repository folder")
    parser.add_argument("--name", default="esm2", help="model name (the folder name)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8M")
    parser.add_argument("--layers", type=int, help="override the shape's layer count")
    parser.add_argument("--dim", type=int, help="override the shape's width (FFN = 4 x dim)")
    parser.add_argument("--heads", type=int, help="override the shape's head count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-hf", type=Path, help="local Hugging Face ESM-2 checkpoint folder")
    parser.add_argument(
        "--backend", choices=["python", "transformers"], default="python",
        help="python: the hand-written encoder (esm2.py; measured faster, see docs/performance.md); "
        "transformers: serve the --from-hf folder itself through backend transformers (no code copied)",
    )
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--max-length", type=int, default=MAX_RESIDUES)
    parser.add_argument("--over-length", choices=["truncate", "error"], default="truncate")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument(
        "--per-residue-dtype", choices=["FP32", "FP16"], default="FP32",
        help="datatype of the per_residue output: FP16 halves what leaves the device, the wire and the parts",
    )
    return parser.parse_args(argv)


def build_transformers(args: argparse.Namespace) -> Path:
    """A model folder serving the --from-hf checkpoint through backend `transformers`: the
    same outputs as the hand-written encoder (mean, per_residue, length), no code of ours."""
    if not args.from_hf:
        raise SystemExit("--backend transformers serves a checkpoint folder: give --from-hf DIR")
    folder = args.from_hf.resolve()
    hf = json.loads((folder / "config.json").read_text())
    dim = int(hf["hidden_size"])
    target = args.out / args.name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    doc = {
        "name": args.name,
        "backend": "transformers",
        "version": "1",
        "description": f"ESM-2 encoder from {folder.name} ({hf['num_hidden_layers']} layers x {dim}) through "
        "transformers.",
        "max_batch_size": args.max_batch_size,
        "transformers": {
            "path": str(folder), "class": "EsmModel", "max_length": args.max_length + 2, "case": "upper",
            "over_length": args.over_length,
            "checksums": {name: file_sha256(folder / name) for name in ["config.json", *weights]},
        },
        # max_length on the input is told to clients: the coordinator applies the job's
        # input.over_length (truncate, marked in a `truncated` column, or error) before sending
        "inputs": [{"name": "sequence", "datatype": "BYTES", "shape": [], "max_length": args.max_length}],
        "outputs": [
            {"name": "mean", "datatype": "FP32", "shape": [dim]},
            {"name": "per_token", "datatype": args.per_residue_dtype, "shape": [-1, dim], "ragged": True},
            {"name": "length", "datatype": "INT32", "shape": []},
        ],
        "batching": {
            "max_queue_delay_ms": 2, "preferred_batch_sizes": [b for b in (16, 32, 64) if b <= args.max_batch_size],
            "max_queue_size": 1024, "token_budget": args.token_budget, "length_bucket": 32,
        },
        "precision": args.precision,
    }
    header = "# Written by examples/esm2/build.py --backend transformers.\n"
    (target / "config.yaml").write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return target


def build(args: argparse.Namespace) -> Path:
    if args.backend == "transformers":
        return build_transformers(args)
    if args.from_hf:
        model = load_hf_checkpoint(args.from_hf)
        source = f"weights from the Hugging Face checkpoint {args.from_hf.name}"
    else:
        config = ESM2Config.shape(args.shape)
        overrides = {k: v for k, v in (("layers", args.layers), ("dim", args.dim), ("heads", args.heads)) if v}
        if "dim" in overrides:
            overrides["ffn"] = 4 * overrides["dim"]
        config = dataclasses.replace(config, **overrides)
        model = build_random(config, args.seed)
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
        "description": f"ESM-2 encoder, {config.layers} layers x {config.dim} ({config.heads} heads), "
        f"{params / 1e6:.1f}M parameters, {source}.",
        "max_batch_size": args.max_batch_size,
        # max_length on the input is told to clients: the coordinator applies the job's
        # input.over_length (truncate, marked in a `truncated` column, or error) before sending
        "inputs": [{"name": "sequence", "datatype": "BYTES", "shape": [], "max_length": args.max_length}],
        "outputs": [
            {"name": "mean", "datatype": "FP32", "shape": [config.dim]},
            {"name": "per_residue", "datatype": args.per_residue_dtype, "shape": [-1, config.dim], "ragged": True},
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
    header = "# Written by examples/esm2/build.py; rebuild rather than edit (the checksums must match).\n"
    (target / "config.yaml").write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return target


def main(argv: list[str] | None = None) -> int:
    folder = build(parse_args(argv))
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
