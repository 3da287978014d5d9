"""`tensorfleet doctor`: is this machine ready to serve? One line per check, OK / WARN / FAIL.

It answers the questions an operator asks before starting a fleet, without starting a server:
which Python and package versions are installed (and do they meet tensorfleet's pins), does
the protobuf runtime load the generated code, is CUDA there and which GPUs (compute
capability, memory), does every model in the repository have a valid config and artifacts
whose sha256 match, and are the ports free. Exit 0 when nothing FAILs, 1 otherwise.

    python -m tensorfleet.services.doctor --model-repository examples/models --port 8001
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from tensorfleet.core.extras import install_hint

OK, WARN, FAIL = "OK", "WARN", "FAIL"
PACKAGES = ["tensorfleet", "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "numpy",
            "pydantic", "PyYAML", "prometheus-client", "torch", "tensorflow", "tensorflow-cpu"]
TORCH_BACKENDS = {"torchscript", "torch_export"}


@dataclass
class Check:
    status: str
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<5} {self.name}: {self.detail}"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_python() -> list[Check]:
    version = platform.python_version()
    status = OK if sys.version_info >= (3, 10) else FAIL
    return [Check(status, "python", f"{version} ({sys.executable})" + ("" if status == OK else "; needs 3.10+"))]


def check_packages() -> list[Check]:
    """Installed versions, and whether they meet tensorfleet's own requirement pins."""
    checks = []
    pins: dict[str, str] = {}
    try:
        from packaging.requirements import Requirement

        for text in metadata.requires("tensorfleet") or []:
            requirement = Requirement(text)
            if requirement.marker is None:  # the core requirements, not the extras
                pins[requirement.name.lower()] = str(requirement.specifier)
    except (ImportError, metadata.PackageNotFoundError):
        pass
    for package in PACKAGES:
        version = _version(package)
        if package.startswith("tensorflow"):
            if version:
                checks.append(Check(OK, f"package {package}", version))
            continue
        if version is None:
            required = package.lower() in pins or package == "tensorfleet"
            detail = "not installed" + ("" if required else f" (needed by the torchscript/torch_export backends: "
                                                            f"{install_hint('torch')})")
            checks.append(Check(FAIL if required else WARN, f"package {package}", detail))
            continue
        specifier = pins.get(package.lower(), "")
        if specifier and not _satisfies(version, specifier):
            checks.append(Check(FAIL, f"package {package}", f"{version}, but tensorfleet needs {specifier}"))
        else:
            checks.append(Check(OK, f"package {package}", version))
    try:
        from tensorfleet.protos import inference_pb2  # noqa: F401  (the protobuf runtime vs generated code)

        checks.append(Check(OK, "protobuf runtime", "loads the generated inference protocol"))
    except Exception as error:  # a runtime older than the generated code fails right here
        checks.append(Check(FAIL, "protobuf runtime", f"cannot load generated code: {error}"))
    return checks


def _satisfies(version: str, specifier: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(specifier).contains(version, prereleases=True)
    except ImportError:
        return True


def check_accelerators(device: str) -> list[Check]:
    """torch's CUDA build and each visible GPU; FAIL only when `device` asks for a GPU that is not there."""
    checks = []
    smi = shutil.which("nvidia-smi")
    if smi:
        done = subprocess.run([smi, "--query-gpu=index,name,driver_version,memory.used,memory.total",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            for row in done.stdout.strip().splitlines():
                checks.append(Check(OK, "nvidia-smi", row.strip()))
        else:
            checks.append(Check(WARN, "nvidia-smi", f"failed: {done.stderr.strip() or done.stdout.strip()}"))
    try:
        import torch
    except ImportError:
        status = FAIL if device.startswith("cuda") else WARN
        return [*checks, Check(status, "cuda", f"torch is not installed: {install_hint('torch')}")]
    build = torch.version.cuda
    if not torch.cuda.is_available():
        why = f"torch {torch.__version__} is a CPU build" if build is None else \
            f"torch {torch.__version__} is built for CUDA {build}, but no GPU or driver is usable"
        status = FAIL if device.startswith("cuda") else WARN
        suffix = f"; --device {device} cannot run" if status == FAIL else "; servers will run on the CPU"
        return [*checks, Check(status, "cuda", why + suffix)]
    count = torch.cuda.device_count()
    checks.append(Check(OK, "cuda", f"torch {torch.__version__}, CUDA {build}, cuDNN "
                        f"{torch.backends.cudnn.version()}, {count} GPU(s) visible"))
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        detail = (f"{props.name}, compute capability {props.major}.{props.minor}, "
                  f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)")
        status = OK if (props.major, props.minor) >= (7, 0) else WARN
        if status == WARN:
            detail += "; below 7.0: no tensor cores for fp16"
        checks.append(Check(status, f"gpu {index}", detail))
    if device.startswith("cuda:") and int(device.split(":")[1]) >= count:
        checks.append(Check(FAIL, "device", f"--device {device}, but only {count} GPU(s) are visible"))
    checks.append(check_nvml())
    return checks


def check_nvml() -> Check:
    """On a GPU machine: can `tensorfleet top` read GPU use through NVML (nvidia-ml-py)?"""
    try:
        import pynvml
    except ImportError:
        return Check(WARN, "nvml", "nvidia-ml-py is not installed: `tensorfleet top` shows no GPU use or "
                                   f"memory; {install_hint('pynvml')}")
    try:
        pynvml.nvmlInit()
        try:
            return Check(OK, "nvml", f"nvidia-ml-py {_version('nvidia-ml-py') or '?'}, driver "
                                     f"{pynvml.nvmlSystemGetDriverVersion()}")
        finally:
            pynvml.nvmlShutdown()
    except Exception as error:  # NVMLError and friends: the library or driver is not usable
        return Check(WARN, "nvml", f"nvidia-ml-py is installed but NVML does not answer: {error}")


def check_repository(root: Path, device: str, load: bool = False) -> list[Check]:
    """Every model's config.yaml validates and every declared artifact matches its sha256."""
    from tensorfleet.core.errors import TensorfleetError

    from .model_config import CONFIG_FILENAME, load_config
    from .repository.repository import verify_artifacts

    if not root.is_dir():
        return [Check(FAIL, "model repository", f"{root} is not a directory")]
    folders = sorted(child for child in root.iterdir() if child.is_dir() and not child.name.startswith("."))
    models = [folder for folder in folders if (folder / CONFIG_FILENAME).is_file()]
    checks = [Check(OK if models else FAIL, "model repository",
                    f"{root.resolve()}: {len(models)} model(s)" if models else f"{root} holds no model folders "
                    f"(each needs a {CONFIG_FILENAME})")]
    for folder in folders:
        if folder not in models:
            checks.append(Check(WARN, f"model {folder.name}", f"no {CONFIG_FILENAME}: the server ignores this folder"))
    has_torch = _version("torch") is not None
    for folder in models:
        name = f"model {folder.name}"
        try:
            config = load_config(folder)
            fingerprint = verify_artifacts(folder, config)
        except TensorfleetError as error:
            checks.append(Check(FAIL, name, error.message))
            continue
        problems = []
        if config.backend in TORCH_BACKENDS and not has_torch:
            problems.append(f"backend {config.backend} needs torch, which is not installed: {install_hint('torch')}")
        if config.backend == "python" and not (folder / config.python.module).is_file():
            problems.append(f"python backend module {config.python.module} is missing")
        if config.backend in TORCH_BACKENDS:
            program = config.model_file or ("model.pt" if config.backend == "torchscript" else "model.pt2")
            if not (folder / program).is_file():
                problems.append(f"program file {program} is missing")
        if problems:
            checks.append(Check(FAIL, name, "; ".join(problems)))
            continue
        summary = f"{config.backend} v{config.version}, {config.precision}, "
        if config.artifacts:
            summary += f"{len(config.artifacts)} artifact(s) match sha256 (fingerprint {fingerprint[:12]})"
            checks.append(Check(OK, name, summary))
        else:
            checks.append(Check(WARN, name, summary + "declares no artifacts: nothing is checksummed"))
        if load:
            checks.append(_load_model(root, folder.name, device))
    return checks


def _load_model(root: Path, model: str, device: str) -> Check:
    """Load and warm one model the way the server does (slow: opt in with --load)."""
    from .repository.repository import ModelRepository

    try:
        repository = ModelRepository(root, device=device, only=[model])
        state = repository.load(model).state.value
        repository.unload(model)
    except Exception as error:
        reason = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
        return Check(FAIL, f"load {model}", f"on {device}: {reason}")
    return Check(OK, f"load {model}", f"loaded and warmed on {device} (state {state})")


def check_ports(ports: list[int], host: str) -> list[Check]:
    checks = []
    for port in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            try:
                sock.bind((host, port))
            except OSError as error:
                checks.append(Check(FAIL, f"port {port}", f"cannot bind {host}:{port}: {error.strerror or error}"))
            else:
                checks.append(Check(OK, f"port {port}", f"{host}:{port} is free"))
    return checks


def check_host() -> list[Check]:
    checks = [Check(OK, "host", f"{platform.node()}, {platform.system()} {platform.release()}, "
                    f"{os.cpu_count()} CPU(s)")]
    shm = Path("/dev/shm")
    if shm.is_dir():
        total = shutil.disk_usage(shm).total
        status = OK if total >= 1 << 30 else WARN
        detail = f"{total / 2**30:.2f} GiB"
        if status == WARN:
            detail += "; small for torch (containers: --shm-size=2g, or a Memory emptyDir on /dev/shm)"
        checks.append(Check(status, "shared memory", detail))
    return checks


def run_checks(repository: Path | None, ports: list[int], device: str = "cpu", host: str = "0.0.0.0",
               load: bool = False) -> list[Check]:
    checks = check_python() + check_packages() + check_host() + check_accelerators(device)
    if repository is not None:
        checks += check_repository(repository, device, load)
    return checks + check_ports(ports, host)


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="tensorfleet doctor",
                                     description="Check that this machine is ready to serve models.")
    parser.add_argument("--model-repository", type=Path, default=env("TENSORFLEET_MODEL_REPOSITORY"))
    parser.add_argument("--port", type=int, action="append", dest="ports", default=None,
                        help="a port the server will bind (repeatable)")
    parser.add_argument("--host", default=env("TENSORFLEET_HOST", "0.0.0.0"), help="address the ports bind on")
    parser.add_argument("--device", default=env("TENSORFLEET_DEVICE", "cpu"), help="cpu, cuda or cuda:N")
    parser.add_argument("--load", action="store_true", help="also load and warm every model (slow)")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = "cuda:0" if args.device == "cuda" else args.device
    checks = run_checks(args.model_repository, args.ports or [], device, args.host, args.load)
    failed = [check for check in checks if check.status == FAIL]
    if args.json:
        print(json.dumps({"ready": not failed, "checks": [asdict(c) for c in checks]}, indent=1))
    else:
        for check in checks:
            print(check.line())
        warnings = sum(check.status == WARN for check in checks)
        if failed:
            print(f"NOT READY: {len(failed)} check(s) failed:")
            for check in failed:
                print(f"  - {check.name}: {check.detail}")
        else:
            print(f"READY ({warnings} warning(s))")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
