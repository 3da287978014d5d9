"""Triton's shared-memory client (tritonclient.utils.shared_memory) against a real tensorfleet server.

The calls run in a subprocess (tests/interop/triton_shm_script.py): tritonclient's generated
modules and ours both register protobuf package `inference`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.serving import REPO_ROOT, running_server

pytestmark = pytest.mark.interop

SCRIPT = Path(__file__).with_name("triton_shm_script.py")


@pytest.fixture(scope="module")
def shm_run(tmp_path_factory) -> tuple[dict, dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("triton_shm")
    with running_server(REPO_ROOT / "tests" / "models", "--model", "simple") as server:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--url", server.address, "--out", str(out)],
            capture_output=True, text=True, timeout=240, cwd=REPO_ROOT, check=False,
        )
        assert result.returncode == 0, f"script failed:\n{result.stdout}\n{result.stderr}\n{server.log()}"
        assert server.process.poll() is None, f"server died:\n{server.log()}"
    with np.load(out / "tensors.npz") as archive:
        tensors = {key: archive[key] for key in archive.files}
    return json.loads((out / "results.json").read_text()), tensors


def test_inputs_and_outputs_in_shared_memory_are_bitwise_right(shm_run) -> None:
    results, tensors = shm_run
    assert "system_shared_memory" in results["extensions"]
    np.testing.assert_array_equal(tensors["sum"], tensors["a"] + tensors["b"])
    np.testing.assert_array_equal(tensors["diff"], tensors["a"] - tensors["b"])


def test_status_lists_the_registered_regions(shm_run) -> None:
    status = shm_run[0]["status"]
    assert set(status) == {"input_data", "output_data"}
    assert status["input_data"]["byte_size"] == "128"
    assert status["input_data"]["key"].startswith("/tf_test_in_")


@pytest.mark.parametrize("case, words", [
    ("unknown_region", ["no_such_region"]),
    ("past_the_end", ["input_data", "offset 96"]),
    ("wrong_size", ["input_data", "64 bytes"]),
    ("key_with_separator", ["evil", "separator"]),
    ("missing_key", ["ghost"]),
    ("too_big_for_object", ["big", "past the end"]),
])
def test_mistakes_are_invalid_argument_naming_the_region(shm_run, case: str, words: list[str]) -> None:
    error = shm_run[0][case]
    assert "INVALID_ARGUMENT" in error["status"], error
    for word in words:
        assert word in error["message"], error


def test_registering_a_name_twice_is_already_exists(shm_run) -> None:
    assert "ALREADY_EXISTS" in shm_run[0]["twice"]["status"]


def test_unregister_one_and_all(shm_run) -> None:
    assert shm_run[0]["after_unregister"] == ["output_data"]
    assert shm_run[0]["after_unregister_all"] == []
