"""Build the ESM-2 example model folder: an `EsmModel` checkpoint served by backend `transformers`.

    python examples/esm2/build.py --shape 8M [--seed 0] [--out examples/esm2/models]
    python examples/esm2/build.py --from-hf /path/to/esm2_t33_650M_UR50D --precision bf16

No code of ours computes the embeddings: transformers loads the checkpoint, so a folder written
by any release's `save_pretrained` (LayerNorms named `gamma`/`beta` included) serves as it is.
With `--from-hf` the model folder's config.yaml points at that checkpoint folder (absolute path,
its config.json and weights pinned by sha256). Without it, a random `EsmModel` at `--shape` is
written into the model folder (`checkpoint/`, fixed seed, no download: the same seed and shape
give the same files). A checkpoint without tokenizer files gets the ESM-2 alphabet written
beside it (`tokenizer/`). Outputs per row: `mean` [dim], `per_token` [L, dim] (ragged, one
vector per residue; job files store it as `per_residue`) and `length`.

`--backend python` builds the hand-written alternative instead (build_handwritten.py: the same
outputs, kept while it measures faster on the CPU; docs/performance.md, "transformers ESM-2").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from tensorfleet.core.hashing import file_sha256

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run as a script: `examples.esm2` importable

#: ESM-2 release shapes: name -> (layers, dim, heads). The FFN is 4 x dim.
SHAPES: dict[str, tuple[int, int, int]] = {
    "8M": (6, 320, 20),
    "35M": (12, 480, 20),
    "150M": (30, 640, 20),
    "650M": (33, 1280, 20),
}
#: The ESM-2 alphabet (33 tokens): four specials, the residue letters, <null_1>, <mask>.
ALPHABET: tuple[str, ...] = ("<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>")
#: Residues per sequence ESM-2 was trained on: 1024 positions minus <cls> and <eos>.
MAX_RESIDUES = 1022
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json")


class BuildError(ValueError):
    """A checkpoint or option this build cannot use; the message says what to fix (exit 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "models", help="model repository folder")
    parser.add_argument("--name", default="esm2", help="model name (the folder name)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8M")
    parser.add_argument("--layers", type=int, help="override the shape's layer count")
    parser.add_argument("--dim", type=int, help="override the shape's width (FFN = 4 x dim)")
    parser.add_argument("--heads", type=int, help="override the shape's head count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-hf", type=Path, help="local Hugging Face ESM-2 checkpoint folder (served as it is)")
    parser.add_argument(
        "--backend", choices=["transformers", "python"], default="transformers",
        help="transformers: the checkpoint served by transformers' EsmModel (default); python: the hand-written "
        "encoder (esm2.py), the same outputs, measured faster on the CPU (docs/performance.md)",
    )
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--max-length", type=int, default=MAX_RESIDUES, help="residues per sequence (<= 1022)")
    parser.add_argument(
        "--over-length", choices=["truncate", "error"], default="truncate",
        help="what the server does with a longer sequence sent straight to it (a job applies its own "
        "input.over_length first)",
    )
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument(
        "--per-residue-dtype", choices=["FP32", "FP16"], default="FP32",
        help="datatype of the per_token output: FP16 halves what crosses the wire and fills the parts",
    )
    return parser.parse_args(argv)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise BuildError("needs transformers: pip install 'tensorfleet[hf]'") from None
    transformers.utils.logging.set_verbosity_error()
    return transformers


def esm_config(shape: str, layers: int | None = None, dim: int | None = None, heads: int | None = None) -> Any:
    """transformers' EsmConfig of an ESM-2 release shape (rotary, token dropout, 1026 positions)."""
    transformers = _transformers()
    base_layers, base_dim, base_heads = SHAPES[shape]
    dim = dim or base_dim
    heads = heads or base_heads
    if dim % heads:
        raise BuildError(f"--dim {dim} is not divisible by {heads} heads")
    return transformers.EsmConfig(
        vocab_size=len(ALPHABET), hidden_size=dim, num_hidden_layers=layers or base_layers, num_attention_heads=heads,
        intermediate_size=4 * dim, max_position_embeddings=MAX_RESIDUES + 4, pad_token_id=ALPHABET.index("<pad>"),
        mask_token_id=ALPHABET.index("<mask>"), position_embedding_type="rotary", token_dropout=True,
        emb_layer_norm_before=False, hidden_act="gelu", layer_norm_eps=1e-5,
    )


def write_alphabet_tokenizer(folder: Path) -> Path:
    """The ESM-2 tokenizer (one token per residue, <cls> ... <eos>), saved as transformers saves it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(ALPHABET) + "\n")
    _transformers().EsmTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def save_random_checkpoint(folder: Path, config: Any, seed: int) -> Path:
    """A random EsmModel (transformers' own initialisation under `seed`) and its tokenizer."""
    import torch

    transformers = _transformers()
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = transformers.EsmModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(folder)
    write_alphabet_tokenizer(folder)
    return folder


def read_esm_config(folder: Path) -> dict:
    """config.json of an ESM-2 encoder checkpoint; BuildError naming what is not."""
    path = folder / "config.json"
    if not path.is_file():
        raise BuildError(f"--from-hf {folder}: no config.json; expected a Hugging Face ESM-2 checkpoint folder")
    hf = json.loads(path.read_text())
    if hf.get("model_type") != "esm":
        raise BuildError(f"--from-hf {folder}: config.json model_type is {hf.get('model_type')!r}, not 'esm'")
    if hf.get("is_folding_model"):
        raise BuildError(f"--from-hf {folder}: an ESMFold checkpoint; use an ESM-2 encoder checkpoint")
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in folder.iterdir()):
        raise BuildError(f"--from-hf {folder}: no weights (model.safetensors or pytorch_model.bin)")
    return hf


def build(args: argparse.Namespace) -> Path:
    """Write `args.out/args.name` (config.yaml, and for a random model its checkpoint); checked first,
    so a bad option leaves an existing folder as it was."""
    if args.backend == "python":
        from examples.esm2.build_handwritten import build_python
        from examples.esm2.checkpoint import CheckpointError

        try:
            return build_python(args)
        except CheckpointError as error:
            raise BuildError(str(error)) from None
    target = args.out / args.name
    if args.from_hf:
        checkpoint = args.from_hf.resolve()
        if target.resolve() == checkpoint or target.resolve() in checkpoint.parents:
            raise BuildError(f"--from-hf {args.from_hf} lies inside the model folder {target}, which is rebuilt")
        hf = read_esm_config(checkpoint)
        config = None
        needs_tokenizer = not any((checkpoint / name).is_file() for name in _TOKENIZER_FILES)
        if needs_tokenizer and int(hf.get("vocab_size", len(ALPHABET))) != len(ALPHABET):
            raise BuildError(f"--from-hf {checkpoint}: no tokenizer files, and its vocab_size {hf.get('vocab_size')} "
                             f"is not the ESM-2 alphabet's {len(ALPHABET)}; put the checkpoint's tokenizer beside it")
    else:
        config = esm_config(args.shape, args.layers, args.dim, args.heads)
        hf = config.to_dict()
        needs_tokenizer = False  # save_random_checkpoint writes the alphabet beside the weights
    positions = int(hf.get("max_position_embeddings") or MAX_RESIDUES + 4)
    if not 1 <= args.max_length <= min(MAX_RESIDUES, positions - 2):
        raise BuildError(f"--max-length {args.max_length}: this checkpoint takes 1..{min(MAX_RESIDUES, positions - 2)} "
                         "residues")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if config is None:
        path = str(checkpoint)
        source = f"the Hugging Face checkpoint {checkpoint.name}"
    else:
        checkpoint = save_random_checkpoint(target / "checkpoint", config, args.seed)
        path = "checkpoint"
        source = f"random weights (transformers' initialisation, seed {args.seed})"
    dim, layers = int(hf["hidden_size"]), int(hf["num_hidden_layers"])
    section: dict[str, Any] = {"path": path, "class": "EsmModel"}
    if needs_tokenizer:
        write_alphabet_tokenizer(target / "tokenizer")
        section["tokenizer"] = "tokenizer"
    section.update({
        "case": "upper",  # ESM's vocabulary holds upper-case residues; FASTA files may be lower-case
        "max_length": args.max_length + 2,  # tokens: <cls> residues <eos>
        "over_length": args.over_length,
        "checksums": {p.name: file_sha256(p) for p in sorted(checkpoint.iterdir())
                      if p.name == "config.json" or p.suffix in _WEIGHT_SUFFIXES},
    })
    doc = {
        "name": args.name,
        "backend": "transformers",
        "version": "1",
        "description": f"ESM-2 encoder, {layers} layers x {dim}, {source}, served by transformers' EsmModel.",
        "max_batch_size": args.max_batch_size,
        "transformers": section,
        # max_length in residues: a job's input.over_length (truncate | error) applies it before sending
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
    header = "# Written by examples/esm2/build.py; rebuild rather than edit (transformers.checksums pin the weights).\n"
    (target / "config.yaml").write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return target


def main(argv: list[str] | None = None) -> int:
    try:
        folder = build(parse_args(argv))
    except BuildError as error:
        print(f"examples/esm2/build.py: {error}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
