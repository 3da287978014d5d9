"""`make gpu-wheels`: the wheels bench/gpu/run.sh installs, offline, on the GPU machine.

    python -m bench.gpu.wheels [--dest .gpu-wheels]

Downloads (needs the package index) into DEST/cp312 the cp312 manylinux x86_64 wheels of
bench/gpu/requirements.txt, one version each and no dependencies: the machine's own packages
(bench/gpu/machine-packages.txt, torch among them) are never fetched. DEST/cp311 gets the
cp311 builds of the compiled ones, for the CPU rehearsal on this project's Python 3.11 only:
the GPU machine needs DEST/cp312 alone.

Then it checks, offline, that the set is whole and installs:
- every requirement of every downloaded wheel (for Python 3.12 on Linux x86_64, no extras) is
  either downloaded, at a version that satisfies it, or one of the machine's packages;
- `pip install --no-index --no-deps --find-links DEST/cp312 --target EMPTY --python-version 3.12
  --only-binary=:all:` installs all of them;
and prints the sizes (the device tool carries at most 64 MiB, working tree included).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
MACHINE_PACKAGES = HERE / "machine-packages.txt"
# the GPU machine: Ubuntu's python3.12 (glibc 2.39); pip matches each manylinux tag exactly
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17, 12, 5)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
# markers evaluated as on the GPU machine
TARGET_ENV = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "extra": "",
}  # fmt: skip
LIMIT_MIB = 64
# on the machine already, carried all the same at the version we need (requirements.txt says why)
CARRIED_ANYWAY = {"grpcio", "protobuf", "typing-extensions", "packaging", "nvidia-ml-py",
                  "pytest", "pluggy", "iniconfig", "pytest-timeout"}
PYPROJECT = HERE.parents[1] / "pyproject.toml"
# pyproject's extras the GPU run needs (torch is the machine's own; dev tools stay here)
EXTRAS = ("io", "gpu")


def pinned(path: Path = REQUIREMENTS) -> dict[str, str]:
    """{canonical name: version} from `name==version` lines."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}: '{line}' is not pinned as name==version")
        pins[canonicalize_name(name.strip())] = version.strip()
    return pins


def machine_packages(path: Path = MACHINE_PACKAGES) -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {canonicalize_name(line) for line in lines if line}


def _platform_args(python: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download(dest: Path) -> None:
    """DEST/cp312: every pinned wheel for the GPU machine; DEST/cp311: the compiled ones again."""
    cp312, cp311 = dest / "cp312", dest / "cp311"
    for folder in (cp312, cp311):
        folder.mkdir(parents=True, exist_ok=True)
    requirements = [f"{name}=={version}" for name, version in pinned().items()]
    _pip("download", "-q", "--no-deps", "-d", str(cp312), *_platform_args("3.12"), *requirements)
    compiled = [f"{name}=={version}" for name, version in pinned().items()
                if not any(_wheel_name(w) == name and _portable(w) for w in cp312.glob("*.whl"))]
    if compiled:
        _pip("download", "-q", "--no-deps", "-d", str(cp311), *_platform_args("3.11"), *compiled)


def _portable(wheel: Path) -> bool:
    """Installs on Python 3.11 as well: pure python, or the stable ABI (abi3)."""
    return wheel.name.endswith("-none-any.whl") or "-abi3-" in wheel.name


def _wheel_name(wheel: Path) -> str:
    return canonicalize_name(parse_wheel_filename(wheel.name)[0])


def _requires(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(metadata).decode())
    requirements = [Requirement(text) for text in message.get_all("Requires-Dist") or []]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(TARGET_ENV)]


def project_requirements(pyproject: Path = PYPROJECT) -> list[Requirement]:
    """The project's runtime dependencies and the extras a GPU run uses."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    texts = list(project["dependencies"])
    for extra in EXTRAS:
        texts += project.get("optional-dependencies", {}).get(extra, [])
    requirements = [Requirement(text) for text in texts]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(TARGET_ENV)]


def check(dest: Path) -> list[str]:
    """Problems with DEST/cp312 (empty: complete, one version each, every requirement met)."""
    problems: list[str] = []
    wheels = sorted((dest / "cp312").glob("*.whl"))
    versions: dict[str, str] = {}
    for wheel in wheels:
        name, version = _wheel_name(wheel), str(parse_wheel_filename(wheel.name)[1])
        if name in versions:
            problems.append(f"two versions of {name}: {versions[name]} and {version} (pip would refuse)")
        versions[name] = version
    for name, version in pinned().items():
        if versions.get(name) != version:
            problems.append(f"{name}=={version} is pinned but {versions.get(name) or 'no wheel'} was downloaded")
    machine = machine_packages()
    for name in sorted(set(versions) & machine - CARRIED_ANYWAY):
        problems.append(f"{name} is on the GPU machine already: do not carry it (or say why in requirements.txt)")
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        if name not in versions and name not in machine:
            problems.append(f"pyproject needs {requirement}: add it to {REQUIREMENTS.name} (the GPU machine lacks it)")
    for wheel in wheels:
        for requirement in _requires(wheel):
            name = canonicalize_name(requirement.name)
            if name in versions:
                if not requirement.specifier.contains(versions[name], prereleases=True):
                    problems.append(f"{wheel.name} needs {requirement}, the set has {name} {versions[name]}")
            elif name not in machine:
                problems.append(f"{wheel.name} needs {requirement}: neither downloaded nor on the GPU machine")
    return problems


def install_offline(dest: Path) -> None:
    """The install the GPU machine will do, for Python 3.12, into an empty folder."""
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-check-") as target:
        _pip("install", "-q", "--no-index", "--no-deps", "--no-compile", "--find-links", str(dest / "cp312"),
             "--target", target, *_platform_args("3.12"), "-r", str(REQUIREMENTS))
        count = sum(1 for p in Path(target).iterdir() if p.name.endswith(".dist-info"))
    print(f"offline install for Python 3.12 into an empty target: {count} distributions")


def _mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.whl")) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=Path(".gpu-wheels"))
    parser.add_argument("--check-only", action="store_true", help="no download: check what is there")
    args = parser.parse_args(argv)
    if not args.check_only:
        download(args.dest)
    problems = check(args.dest)
    for problem in problems:
        print(f"gpu-wheels: {problem}", file=sys.stderr)
    if problems:
        return 1
    install_offline(args.dest)
    cp312, cp311 = _mib(args.dest / "cp312"), _mib(args.dest / "cp311")
    print(f"{args.dest}/cp312: {len(list((args.dest / 'cp312').glob('*.whl')))} wheels, {cp312:.1f} MiB "
          f"(carry this to the GPU machine; limit {LIMIT_MIB} MiB with the working tree)")
    print(f"{args.dest}/cp311: {cp311:.1f} MiB (CPU rehearsal on Python 3.11 only; do not carry)")
    return 0 if cp312 < LIMIT_MIB / 2 else 1


if __name__ == "__main__":
    sys.exit(main())
