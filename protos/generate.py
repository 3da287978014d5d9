"""Regenerate the Python modules from the .proto sources: `python -m tensorfleet.protos.generate`.

The sources are staged under `tensorfleet/protos/` so the generated imports read
`from tensorfleet.protos import ...` and descriptors carry the package path that
reflection clients (grpcurl) see.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("model_config.proto", "inference.proto", "tensorfleet.proto")


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules for every .proto into `out_dir`; return their paths."""
    from grpc_tools import protoc  # dev-only dependency

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp, "tensorfleet", "protos")
        staged.mkdir(parents=True)
        for name in PROTO_FILES:
            shutil.copy(PROTO_DIR / name, staged / name)
        args = [
            "protoc",
            f"-I{tmp}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[f"tensorfleet/protos/{name}" for name in PROTO_FILES],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see its message above")
        written = []
        for produced in sorted(staged.iterdir()):
            if produced.suffix in (".py", ".pyi"):
                target = out_dir / produced.name
                shutil.copy(produced, target)
                written.append(target)
        return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="where to write the modules")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
