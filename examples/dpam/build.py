"""Build the DPAM example: a torch feature stage, the TF1 DOMASS classifier, and candidate domains.

    python examples/dpam/build.py [--out examples/dpam]

writes `<out>/models/dpam_features` (python backend, torch), `<out>/models/domass` (TF1
checkpoint, `tensorflow_graph` backend; built by examples/dpam_domass/build.py) and
`<out>/data/domains.parquet` (id column `domain`, `hits`: 24 floats per row). Fixed seeds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from tensorfleet.core.hashing import file_sha256

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def build_features(repository: Path, seed: int = 3) -> Path:
    import torch
    import yaml

    source = HERE / "models" / "dpam_features"  # the committed model class
    sys.path.insert(0, str(source))
    from model import FEATURES, SIGNALS, network  # type: ignore[import-not-found]

    folder = repository / "dpam_features"
    folder.mkdir(parents=True, exist_ok=True)
    if source.resolve() != folder.resolve():
        shutil.copyfile(source / "model.py", folder / "model.py")
    torch.manual_seed(seed)
    torch.save(network().state_dict(), folder / "features.pt")
    config = {
        "name": "dpam_features", "backend": "python", "version": "1",
        "description": f"DPAM stage 1 stand-in: hit signals -> 13 DOMASS features (torch MLP, seed {seed})",
        "max_batch_size": 256,
        "inputs": [{"name": "hits", "datatype": "FP32", "shape": [SIGNALS]}],
        "outputs": [{"name": "features", "datatype": "FP32", "shape": [FEATURES]}],
        "batching": {"max_queue_delay_ms": 2},
        "artifacts": {"model.py": file_sha256(folder / "model.py"), "features.pt": file_sha256(folder / "features.pt")},
        "warmup": [{"hits": [0.0] * SIGNALS}],
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=None))
    return folder


def build_domass(repository: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from examples.dpam_domass.build import build

    return build(repository)


def build_data(path: Path, rows: int = 300, seed: int = 11) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    hits = rng.standard_normal((rows, 24)).astype(np.float32)
    table = pa.table({
        "domain": [f"AF-P{index:05d}-D{index % 3 + 1}" for index in range(rows)],
        "hits": pa.FixedSizeListArray.from_arrays(pa.array(hits.reshape(-1)), 24),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    for path in (build_features(args.out / "models"), build_domass(args.out / "models"),
                 build_data(args.out / "data" / "domains.parquet")):
        print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
