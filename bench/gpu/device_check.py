"""Step 1 of bench/gpu/run.sh: what this machine is, and whether the kit took.

Prints one JSON line: Python, torch and its CUDA, the device (name, memory, capability),
NVML's reading when nvidia-ml-py is there, and for each package the project imports where it
was imported from (`kit`: the wheels run.sh installed; `machine`: the machine's own), with its
version. Exits 1 when `--device cuda` is asked for and CUDA is not available, or when the
project or a carried package does not import.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys

# (import name, distribution name) of what the server and the tests import
PACKAGES = [
    ("pydantic", "pydantic"), ("grpc", "grpcio"), ("google.protobuf", "protobuf"),
    ("grpc_health", "grpcio-health-checking"), ("grpc_reflection", "grpcio-reflection"),
    ("numpy", "numpy"), ("yaml", "pyyaml"), ("prometheus_client", "prometheus-client"),
    ("h5py", "h5py"), ("pyarrow", "pyarrow"), ("anndata", "anndata"), ("psutil", "psutil"),
    ("pynvml", "nvidia-ml-py"), ("rich", "rich"), ("fastapi", "fastapi"), ("pytest", "pytest"), ("pytest_asyncio", "pytest-asyncio"),
]  # fmt: skip
# used by some features only (h5ad output, NVML readings, the REST front end): reported, not a failure when missing
OPTIONAL = {"anndata", "pynvml", "pyarrow", "h5py", "fastapi"}
PROJECT = ["tensorfleet.protos.inference_pb2", "tensorfleet.client", "tensorfleet.services.server",
           "tensorfleet.coordinator.cli"]


def _origin(module: object, kit: str) -> str:
    path = os.path.realpath(getattr(module, "__file__", "") or "")
    return "kit" if kit and path.startswith(os.path.realpath(kit)) else "machine"


def packages(kit: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    found: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    for module_name, dist in PACKAGES:
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # one missing package must not hide the others
            found[dist] = {"error": f"{type(error).__name__}: {error}"}
            if module_name not in OPTIONAL:
                problems.append(f"{module_name}: {type(error).__name__}: {error}")
            continue
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = getattr(module, "__version__", "?")
        found[dist] = {"version": version, "from": _origin(module, kit)}
    for name in PROJECT:
        try:
            importlib.import_module(name)
        except Exception as error:
            problems.append(f"{name}: {type(error).__name__}: {error}")
    return found, problems


def device(wanted: str) -> dict[str, object]:
    import torch

    facts: dict[str, object] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                                "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        facts.update(device_count=torch.cuda.device_count(), name=props.name,
                     capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                     memory_total_gib=round(total / 2**30, 1), memory_free_gib=round(free / 2**30, 1),
                     bf16_supported=torch.cuda.is_bf16_supported())
    try:
        import pynvml

        pynvml.nvmlInit()
        facts["nvml_driver"] = pynvml.nvmlSystemGetDriverVersion()
        facts["nvml_devices"] = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception as error:  # no driver (the CPU rehearsal) or no nvidia-ml-py
        facts["nvml"] = f"{type(error).__name__}: {error}"
    facts["wanted"] = wanted
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True)
    parser.add_argument("--kit", default="", help="the folder run.sh installed the wheels into")
    args = parser.parse_args(argv)
    found, problems = packages(args.kit)
    facts = device(args.device)
    if args.device == "cuda" and not facts["cuda_available"]:
        problems.append("--device cuda: torch sees no CUDA device")
    line = {"step": "device", "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), **facts, "packages": found, "problems": problems}
    print(json.dumps(line))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
