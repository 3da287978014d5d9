"""What the gpu-marked tests share: the device they run on.

On a machine with CUDA they run on cuda:0. Without it they skip, except on the GPU kit's CPU
rehearsal (`bash bench/gpu/run.sh --rehearse` sets TENSORFLEET_GPU_TESTS_ON_CPU=1): then the
tests that mean something on any device run on the CPU, so their code is known to work before
it first meets a GPU, and the CUDA-only ones (`cuda_only`) still skip.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

CUDA = torch.cuda.is_available()
ON_CPU = os.environ.get("TENSORFLEET_GPU_TESTS_ON_CPU") == "1"
# set by bench/gpu/run.sh on the GPU machine: there a missing GPU is a failure, not a skip
REQUIRED = os.environ.get("TENSORFLEET_GPU_TESTS_REQUIRE_CUDA") == "1"
cuda_only = pytest.mark.skipif(not CUDA and not REQUIRED, reason="needs a CUDA device (nothing to rehearse on the CPU)")


@pytest.fixture(autouse=True)
def _cuda_when_required() -> None:
    if REQUIRED and not CUDA:
        pytest.fail(f"bench/gpu/run.sh runs these on a GPU machine, but torch {torch.__version__} sees no CUDA device")


@pytest.fixture(scope="session")
def device() -> str:
    if CUDA:
        return "cuda:0"
    if REQUIRED:
        pytest.fail(f"bench/gpu/run.sh runs these on a GPU machine, but torch {torch.__version__} sees no CUDA device")
    if ON_CPU:
        return "cpu"
    pytest.skip("needs a CUDA device (TENSORFLEET_GPU_TESTS_ON_CPU=1 runs the device-generic ones on the CPU)")
