"""Build the STACK example: the in-context model and query / prompt / control-prompt .h5ad files.

    python examples/stack/build.py [--out examples/stack] [--genes 64] [--query 400]

writes `<out>/models/stack_toy` and `<out>/data/{query,prompt,control_prompt}.h5ad`. Fixed seeds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from tensorfleet.core.hashing import file_sha256

HERE = Path(__file__).resolve().parent


def build_model(repository: Path, genes: int, seed: int = 7) -> Path:
    import yaml

    folder = repository / "stack_toy"
    folder.mkdir(parents=True, exist_ok=True)
    source = HERE / "models" / "stack_toy" / "model.py"  # the committed model class
    if source.resolve() != (folder / "model.py").resolve():
        shutil.copyfile(source, folder / "model.py")
    projection = np.random.default_rng(seed).standard_normal((genes, 16)).astype(np.float32) / genes**0.5
    np.save(folder / "projection.npy", projection)
    config = {
        "name": "stack_toy", "backend": "python", "version": "1",
        "description": f"in-context cell predictor stand-in ({genes} genes, seed {seed})",
        "max_batch_size": 64,
        "inputs": [
            {"name": "query", "datatype": "FP32", "shape": [genes], "sparse": "csr"},
            {"name": "prompt", "datatype": "FP32", "shape": [genes], "optional": True},
        ],
        "outputs": [{"name": "prediction", "datatype": "FP32", "shape": [genes]}],
        "batching": {"max_queue_delay_ms": 2},
        "artifacts": {"model.py": file_sha256(folder / "model.py"), "projection.npy": file_sha256(folder / "projection.npy")},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=None))
    return folder


def cells(count: int, genes: int, seed: int, shift: float, prefix: str):
    import anndata
    import pandas as pd

    rng = np.random.default_rng(seed)
    rates = rng.gamma(1.0, 1.0, genes) * (1 + shift * (np.arange(genes) < genes // 4))
    counts = rng.poisson(rates, (count, genes)).astype(np.float32)
    obs = pd.DataFrame({"batch": pd.Categorical(rng.choice(["b1", "b2"], count))},
                       index=[f"{prefix}-{i:05d}" for i in range(count)])
    var = pd.DataFrame(index=[f"GENE{i:04d}" for i in range(genes)])
    return anndata.AnnData(X=counts, obs=obs, var=var)


def build_data(out: Path, genes: int, query: int = 400, prompt: int = 48) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, count, seed, shift in (("query", query, 1, 0.0), ("prompt", prompt, 2, 3.0), ("control_prompt", prompt, 3, 0.0)):
        path = out / f"{name}.h5ad"
        cells(count, genes, seed, shift, name).write_h5ad(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--genes", type=int, default=64)
    parser.add_argument("--query", type=int, default=400)
    args = parser.parse_args(argv)
    for path in [build_model(args.out / "models", args.genes), *build_data(args.out / "data", args.genes, args.query)]:
        print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
