"""Write the demo FASTA: synthetic protein sequences from a fixed seed.

Lengths are lognormal (sigma 0.55, as in real proteomes) clipped to 30..1022 residues.
Real proteomes have a median near 300; the demo uses a median of 120 so that embedding
the whole file stays quick on a 2-core CPU. Residues follow typical amino-acid background
frequencies. Benchmarks that want realistic lengths pass `--median 300`.

    python examples/data/make_fasta.py                      # examples/data/proteins.fasta
    python examples/data/make_fasta.py --count 100000 --median 300 --out /tmp/big.fasta
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
#: Approximate amino-acid background frequencies (percent) of UniProtKB/Swiss-Prot.
FREQUENCIES = {
    "A": 8.25,
    "R": 5.53,
    "N": 4.06,
    "D": 5.45,
    "C": 1.37,
    "Q": 3.93,
    "E": 6.75,
    "G": 7.07,
    "H": 2.27,
    "I": 5.96,
    "L": 9.66,
    "K": 5.84,
    "M": 2.42,
    "F": 3.86,
    "P": 4.70,
    "S": 6.56,
    "T": 5.34,
    "W": 1.08,
    "Y": 2.92,
    "V": 6.87,
}
MIN_LENGTH, MAX_LENGTH = 30, 1022


def synthetic_proteins(count: int, median: float, sigma: float, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), sigma, count).round(), MIN_LENGTH, MAX_LENGTH)
    letters = np.frombuffer("".join(FREQUENCIES).encode(), dtype=np.uint8)
    weights = np.array(list(FREQUENCIES.values()))
    residues = rng.choice(letters, size=int(lengths.sum()), p=weights / weights.sum())
    ends = np.cumsum(lengths.astype(np.int64))
    sequences = [b"M" + chunk.tobytes()[1:] for chunk in np.split(residues, ends[:-1])]
    return sequences


def write_fasta(path: Path, sequences: list[bytes], width: int = 60) -> None:
    with open(path, "wb") as out:
        for number, sequence in enumerate(sequences, start=1):
            out.write(b">prot_%06d synthetic\n" % number)
            for start in range(0, len(sequence), width):
                out.write(sequence[start : start + width] + b"\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "proteins.fasta")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--median", type=float, default=120.0)
    parser.add_argument("--sigma", type=float, default=0.55)
    parser.add_argument("--seed", type=int, default=20261123)
    args = parser.parse_args(argv)
    write_fasta(args.out, synthetic_proteins(args.count, args.median, args.sigma, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
