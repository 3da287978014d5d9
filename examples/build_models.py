"""Build the bundled example model repository (`examples/models/`).

Model weights cannot be downloaded on the machines this project runs on, so the example
protein embedder gets random weights from a fixed seed (`torch.manual_seed`), built on the
CPU. In one checkout, the same seed, shape and torch version always give a byte-identical
`encoder.pt`. TorchScript's debug records hold the source files' paths (this checkout's and
torch's), so a checkout in another folder gets other bytes: `config.yaml`, which lists the
checksums, is written here beside `encoder.pt` rather than committed.

    python examples/build_models.py                      # the 8M shape into examples/models
    python examples/build_models.py --layers 33 --dim 1280 --heads 20 --out /tmp/repo
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from tensorfleet.core.hashing import file_sha256

HERE = Path(__file__).resolve().parent
MODEL_NAME = "protein_embedder"
SOURCE_MODEL_DIR = HERE / "models" / MODEL_NAME

CONFIG_TEMPLATE = """\
# Written by examples/build_models.py; rebuild rather than edit (the checksums must match).
name: {name}
backend: python
version: "1"
description: >-
  ESM-2-shaped protein encoder ({layers} layers, d={dim}, {heads} heads, ffn {ffn}) with
  fixed-seed random weights (seed {seed}); BYTES sequences are tokenized on the server and
  {output_note}.
max_batch_size: {max_batch_size}
inputs:
  # max_length is told to clients (ModelConfig parameters): the coordinator truncates, or
  # fails, longer rows itself and records which (input.over_length). Same limit as below.
  - {{name: sequence, datatype: BYTES, shape: [], max_length: 1022}}
outputs:
{outputs}
batching:
  max_queue_delay_ms: 2
  preferred_batch_sizes: [16, 32, 64]
  max_queue_size: 1024
  token_budget: {token_budget}
  length_bucket: 32
precision: {precision}
artifacts:
  model.py: {model_sha}
  encoder.pt: {encoder_sha}
parameters:
  # Longer sequences keep their first max_length residues (ESM-2's limit is 1022).
  max_length: 1022
warmup:
  - {{sequence: "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWUAADHNLPRALLQAVESAYLSKLLEERAPAGR"}}
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "models", help="model repository folder")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=320)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--ffn", type=int, default=0, help="feed-forward width; 0 = 4 x dim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument(
        "--per-residue", choices=["FP32", "FP16"],
        help="serve per-residue states (output `residues`, this datatype) instead of mean-pooled",
    )
    args = parser.parse_args(argv)
    if args.dim % args.heads:
        parser.error(f"--dim {args.dim} is not a multiple of --heads {args.heads}")
    return args


def build(args: argparse.Namespace) -> Path:
    """Write encoder.pt, model.py and config.yaml into OUT/protein_embedder; return that folder."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    from examples.protein.encoder import EncoderShape, build_encoder

    target = args.out.resolve() / MODEL_NAME
    target.mkdir(parents=True, exist_ok=True)
    if target != SOURCE_MODEL_DIR:
        shutil.copyfile(SOURCE_MODEL_DIR / "model.py", target / "model.py")
    shape = EncoderShape(layers=args.layers, dim=args.dim, heads=args.heads, ffn=args.ffn)
    encoder = build_encoder(shape, seed=args.seed)
    partial = target / "encoder.pt.tmp"
    torch.jit.save(encoder, str(partial))
    os.replace(partial, target / "encoder.pt")
    config = CONFIG_TEMPLATE.format(
        name=MODEL_NAME,
        layers=shape.layers,
        dim=shape.dim,
        heads=shape.heads,
        ffn=shape.ffn_dim,
        seed=args.seed,
        max_batch_size=args.max_batch_size,
        token_budget=args.token_budget,
        precision=args.precision,
        output_note=(
            "each residue's state is returned" if args.per_residue else "the embeddings are mean-pooled over residues"
        ),
        outputs=(
            f"  - {{name: residues, datatype: {args.per_residue}, shape: [-1, {shape.dim}], ragged: true}}"
            if args.per_residue else f"  - {{name: embedding, datatype: FP32, shape: [{shape.dim}]}}"
        ),
        model_sha=file_sha256(target / "model.py"),
        encoder_sha=file_sha256(target / "encoder.pt"),
    )
    (target / "config.yaml").write_text(config)
    return target


def rerun_with_fixed_hash_seed(script: str, argv: list[str] | None) -> int | None:
    """Run `script` again under PYTHONHASHSEED=0 and return its exit code; None if already so.

    TorchScript writes module constants in set order, which follows Python's string hashing:
    a fixed hash seed makes encoder.pt byte-identical from build to build."""
    if os.environ.get("PYTHONHASHSEED") == "0":
        return None
    import subprocess

    command = [sys.executable, str(Path(script).resolve()), *(sys.argv[1:] if argv is None else argv)]
    return subprocess.call(command, env={**os.environ, "PYTHONHASHSEED": "0"})


def main(argv: list[str] | None = None) -> int:
    rerun = rerun_with_fixed_hash_seed(__file__, argv)
    if rerun is not None:
        return rerun
    args = parse_args(argv)
    target = build(args)
    print(f"built {target} ({args.layers} layers, d={args.dim}, {args.heads} heads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
