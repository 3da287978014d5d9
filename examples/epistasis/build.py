"""Build the epistasis example: two protein embedders of different sizes and mutant FASTA sources.

The epistasis pipeline embeds a wild type and its single and double mutants with several
models and writes one sheet per model. Weights are random from fixed seeds (no download);
the sequences come from a fixed-seed generator.

    python examples/epistasis/build.py [--out examples/epistasis] [--models-only]

writes `<out>/models/{embed_small,embed_tiny}`, `<out>/data/{singles,doubles}.fasta` and the same
mutants as one table, `<out>/data/mutants.tsv` (id, source, sequence).
The models are built, not committed (`make models` builds them): TorchScript records the
checkout's paths, so their bytes and checksums differ from one folder to another. The FASTA
files are small text and committed; rebuilding writes the same bytes.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
#: name -> (layers, dim, heads, seed, max_batch_size)
MODELS = {"embed_small": (2, 64, 4, 1, 16), "embed_tiny": (1, 32, 4, 2, 8)}


def build_models(out: Path) -> list[Path]:
    sys.path.insert(0, str(ROOT))
    from examples import build_models

    built = []
    for name, (layers, dim, heads, seed, batch) in MODELS.items():
        staging = out / f".build-{name}"
        args = build_models.parse_args(
            ["--out", str(staging), "--layers", str(layers), "--dim", str(dim), "--heads", str(heads),
             "--seed", str(seed), "--max-batch-size", str(batch), "--token-budget", "4096"]
        )
        folder = build_models.build(args)
        config = (folder / "config.yaml").read_text().replace(
            f"name: {build_models.MODEL_NAME}\n", f"name: {name}\n", 1
        )
        (folder / "config.yaml").write_text(config)
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        folder.rename(target)
        shutil.rmtree(staging)
        built.append(target)
    return built


def mutants(wild_type: str, count: int, order: int, seed: int) -> list[tuple[str, str]]:
    """`count` distinct mutants with `order` substitutions each, named like A12G:L30K."""
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    while len(seen) < count:
        positions = sorted(rng.sample(range(len(wild_type)), order))
        sequence = list(wild_type)
        names = []
        for position in positions:
            new = rng.choice([r for r in RESIDUES if r != wild_type[position]])
            names.append(f"{wild_type[position]}{position + 1}{new}")
            sequence[position] = new
        seen.setdefault(":".join(names), "".join(sequence))
    return list(seen.items())


def build_data(out: Path, singles: int = 40, doubles: int = 60, seed: int = 5) -> list[Path]:
    rng = random.Random(seed)
    wild_type = "".join(rng.choice(RESIDUES) for _ in range(48))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    table: list[tuple[str, str, str]] = []
    for name, count, order in (("singles", singles, 1), ("doubles", doubles, 2)):
        records = [("WT", wild_type)] + mutants(wild_type, count, order, seed + order) if order == 1 else mutants(
            wild_type, count, order, seed + order
        )
        path = out / f"{name}.fasta"
        path.write_text("".join(f">{key}\n{value}\n" for key, value in records))
        paths.append(path)
        table.extend((key, name, value) for key, value in records)
    # the same mutants as the pipeline keeps them: one TSV with a source column (group_by splits it)
    tsv = out / "mutants.tsv"
    tsv.write_text("id\tsource\tsequence\n" + "".join(f"{key}\t{name}\t{value}\n" for key, name, value in table))
    return [*paths, tsv]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from examples.build_models import rerun_with_fixed_hash_seed

    rerun = rerun_with_fixed_hash_seed(__file__, argv)
    if rerun is not None:
        return rerun
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--models-only", action="store_true", help="leave the FASTA files as they are")
    args = parser.parse_args(argv)
    built = build_models(args.out / "models")
    if not args.models_only:
        built += build_data(args.out / "data")
    for path in built:
        print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
