"""`python -m tensorfleet.services.doctor`: ready (exit 0) on this CPU machine with the example
repository; not ready (exit 1), with one reason per failed check, on a repository whose
artifact was tampered with, a taken port, or a GPU that is not there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tensorfleet.services import doctor
from tests.serving import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples" / "models"
TEST_MODELS = REPO_ROOT / "tests" / "models"


def _doctor(*args: str) -> subprocess.CompletedProcess:
    """The real command, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "tensorfleet.services.doctor", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=180)


def _doctor_here(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """The same entry point in this process: torch is imported once, not once per run."""
    capsys.readouterr()
    code = doctor.main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def _lines(output: str, status: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"{status} ")]


def _examples_built() -> bool:
    try:
        config = yaml.safe_load((EXAMPLES / "protein_embedder" / "config.yaml").read_text())
    except OSError:
        return False
    return all((EXAMPLES / "protein_embedder" / name).is_file() for name in config.get("artifacts", {}))


def _checksummed_copy(tmp_path: Path) -> Path:
    """tests/models/simple with its model.py declared as a checksummed artifact."""
    root = tmp_path / "repository"
    shutil.copytree(TEST_MODELS / "simple", root / "simple")
    config_path = root / "simple" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["artifacts"] = {"model.py": hashlib.sha256((root / "simple" / "model.py").read_bytes()).hexdigest()}
    config_path.write_text(yaml.safe_dump(config))
    return root


@pytest.mark.skipif(not _examples_built(), reason="examples/models is not built: run `make models`")
def test_ready_on_this_cpu_machine_with_the_example_repository() -> None:
    with socket.socket() as sock:  # a port that is free right now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = _doctor("--model-repository", str(EXAMPLES), "--host", "127.0.0.1", "--port", str(port))
    assert done.returncode == 0, done.stdout + done.stderr
    assert _lines(done.stdout, "FAIL") == []
    assert done.stdout.splitlines()[-1].startswith("READY")
    for name in ("python", "package grpcio", "package protobuf", "package numpy", "package torch",
                 "protobuf runtime", "cuda", "model repository", "model protein_embedder", f"port {port}"):
        assert any(line[6:].startswith(f"{name}:") for line in done.stdout.splitlines()), f"no {name} line"
    (model_line,) = [line for line in done.stdout.splitlines() if "model protein_embedder:" in line]
    assert model_line.startswith("OK ") and "artifact(s) match sha256" in model_line


@pytest.mark.skipif(not _examples_built(), reason="examples/models is not built: run `make models`")
def test_a_tampered_example_artifact_fails_with_the_reason(tmp_path: Path) -> None:  # the real CLI
    copy = tmp_path / "models"
    shutil.copytree(EXAMPLES, copy)
    config = yaml.safe_load((copy / "protein_embedder" / "config.yaml").read_text())
    artifact = next(name for name in config["artifacts"] if name != "model.py")
    with open(copy / "protein_embedder" / artifact, "ab") as handle:
        handle.write(b"\0")
    done = _doctor("--model-repository", str(copy))
    assert done.returncode == 1, done.stdout
    (failed,) = _lines(done.stdout, "FAIL")
    assert failed.startswith("FAIL  model protein_embedder:")
    assert f"artifact {artifact} has sha256" in failed and config["artifacts"][artifact] in failed
    assert "NOT READY: 1 check(s) failed:" in done.stdout


def test_checksums_pass_then_a_tampered_artifact_a_taken_port_and_a_missing_gpu_each_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _checksummed_copy(tmp_path)
    good = _doctor_here(capsys, "--model-repository", str(root), "--json")
    report = json.loads(good.stdout)
    assert good.returncode == 0 and report["ready"] is True, good.stdout
    (model,) = [c for c in report["checks"] if c["name"] == "model simple"]
    assert model["status"] == "OK" and "1 artifact(s) match sha256" in model["detail"]

    with open(root / "simple" / "model.py", "a") as handle:
        handle.write("# tampered\n")
    import torch

    gpu_missing = not torch.cuda.is_available()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bad = _doctor_here(capsys, "--model-repository", str(root), "--host", "127.0.0.1", "--port", str(port),
                      *(["--device", "cuda:0"] if gpu_missing else []))
    assert bad.returncode == 1, bad.stdout
    failed = {line.split(":", 1)[0].removeprefix("FAIL  "): line for line in _lines(bad.stdout, "FAIL")}
    assert "artifact model.py has sha256" in failed["model simple"]
    assert "cannot bind" in failed[f"port {port}"]
    if gpu_missing:
        assert "--device cuda:0 cannot run" in failed["cuda"]
    assert f"NOT READY: {len(failed)} check(s) failed:" in bad.stdout
    assert bad.stdout.count("\n  - ") == len(failed)  # one reason per failed check


def test_a_broken_config_and_an_empty_repository_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _checksummed_copy(tmp_path)
    config_path = root / "simple" / "config.yaml"
    config_path.write_text(config_path.read_text().replace("FP32", "FLOAT", 1))
    (root / "notes").mkdir()
    done = _doctor_here(capsys, "--model-repository", str(root))
    assert done.returncode == 1
    (failed,) = _lines(done.stdout, "FAIL")
    assert "model simple" in failed and "inputs.0.datatype" in failed and "FLOAT" in failed
    assert any("model notes: no config.yaml" in line for line in _lines(done.stdout, "WARN"))

    empty = tmp_path / "empty"
    empty.mkdir()
    done = _doctor_here(capsys, "--model-repository", str(empty))
    assert done.returncode == 1 and "holds no model folders" in done.stdout


def test_nvml_says_what_is_missing_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """`check_nvml` runs once GPUs are found; this machine has none, so it is called directly."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if nvidia-ml-py were not installed
    missing = doctor.check_nvml()
    assert missing.status == doctor.WARN and "pip install 'tensorfleet[gpu]'" in missing.detail
    monkeypatch.delitem(sys.modules, "pynvml")
    pytest.importorskip("pynvml")
    here = doctor.check_nvml()  # installed; without a driver NVML cannot answer
    assert here.status in (doctor.OK, doctor.WARN) and "not installed" not in here.detail
