"""The CUDA path, served for real: precision, narrowing, copies, warm-up, out-of-memory, count auto.

Run on the GPU machine by `bash bench/gpu/run.sh` (`pytest -m gpu`). Each test that measures
something prints one JSON line (run.sh collects them into its summary); none asserts a time.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tensorfleet.client import InferenceClient
from tests.gpu.conftest import CUDA, cuda_only
from tests.gpu.tiny_encoder import build_model, reference, token_rows, write_model
from tests.serving import running_server

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

# (precision, largest allowed difference from fp32) for the mean-pooled output
PRECISIONS = {"bf16": 0.08, "fp16": 0.01}


def _report(test: str, **figures) -> None:
    print("\n" + json.dumps({"test": test, "device": torch.cuda.get_device_name(0) if CUDA else "cpu", **figures}))


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    repo = tmp_path_factory.mktemp("gpu_repo")
    model = build_model()
    write_model(repo, "enc_fp32", model)
    for precision in PRECISIONS:
        write_model(repo, f"enc_{precision}", model, precision=precision)
    write_model(repo, "enc_warm", model, batching={
        "pad_to_bucket": True, "length_bucket": 32, "warmup_shapes": [[1, 32], [8, 32], [8, 64], [32, 64]],
    })  # fmt: skip
    return repo, model


@pytest.fixture(scope="module")
def server(repository, device):
    repo, _ = repository
    with running_server(repo, "--device", device) as process:
        yield process


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_reduced_precision_is_close_to_fp32(server, precision):
    rows = token_rows(32, seed=3)
    with InferenceClient(server.address) as client:
        full = list(client.stream("enc_fp32", [{"tokens": r} for r in rows], window=8))
        reduced = list(client.stream(f"enc_{precision}", [{"tokens": r} for r in rows], window=8))
    worst = max(float(np.abs(a["mean"] - b["mean"]).max()) for a, b in zip(full, reduced, strict=True))
    scale = max(float(np.abs(a["mean"]).max()) for a in full)
    _report(f"reduced_precision_{precision}", max_abs_diff_vs_fp32=worst, max_abs_fp32=scale)
    assert worst <= PRECISIONS[precision] * max(scale, 1.0), f"{precision} drifted {worst} from fp32"
    assert worst > 0, f"{precision} gave fp32's exact values: the model did not run in {precision}"


def test_fp32_on_the_device_matches_the_model_in_process(server, repository, device):
    _, model = repository
    rows = token_rows(8, seed=4)
    with InferenceClient(server.address) as client:
        served = [client.infer("enc_fp32", {"tokens": r}) for r in rows]
    for request, result in zip(rows, served, strict=True):
        mean, states = reference(model, request, device)
        np.testing.assert_allclose(result["mean"], mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(result["states"].astype(np.float32), states, rtol=2e-3, atol=2e-3)


def test_outputs_are_narrowed_on_the_device(repository, device):
    """The FP16 output leaves predict as float16 straight from the device copy: no host cast."""
    from tensorfleet.services.backends.base import ModelContext
    from tensorfleet.services.backends.torchscript import TorchScriptBackend
    from tensorfleet.services.model_config import load_config

    repo, model = repository
    config = load_config(repo / "enc_bf16")
    backend = TorchScriptBackend(ModelContext(repo / "enc_bf16", config, device=device, precision="bf16"))
    backend.load()
    tokens = token_rows(1, seed=5, shortest=20, longest=20)[0]
    out = backend.predict({"tokens": tokens})
    assert out["states"].dtype == np.float16 and out["mean"].dtype == np.float32
    _, states = reference(model, tokens, device, torch.bfloat16)
    # bf16 states narrowed to fp16 (TorchScript may fuse differently from eager: bf16's own step)
    np.testing.assert_allclose(out["states"].astype(np.float32), states, rtol=1e-2, atol=1e-2)
    stages = backend.last_stages()
    assert set(stages) == {"h2d", "compute", "d2h"} and stages["compute"] > 0
    _report("stage_times_one_predict", **{f"{k}_us": v / 1e3 for k, v in stages.items()})


@cuda_only
def test_copies_use_pinned_host_memory(repository):
    from tensorfleet.services.backends.base import ModelContext
    from tensorfleet.services.backends.torchscript import TorchScriptBackend
    from tensorfleet.services.model_config import load_config

    repo, _ = repository
    config = load_config(repo / "enc_fp32")
    backend = TorchScriptBackend(ModelContext(repo / "enc_fp32", config, device="cuda:0"))
    backend.load()
    tokens = np.ones((32, 512), np.int64)
    tokens.flags.writeable = False  # as a request's zero-copy bytes arrive
    host_stats = getattr(torch.cuda, "host_memory_stats", dict)  # torch >= 2.6
    before = host_stats()
    out = backend.predict({"tokens": tokens})
    after = host_stats()
    grew = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int) and after[k] != before.get(k, 0)}
    # the output arrays are views of page-locked buffers, filled by non-blocking copies
    assert torch.from_numpy(out["mean"]).is_pinned() and torch.from_numpy(out["states"]).is_pinned()
    stages = backend.last_stages()
    assert stages["h2d"] > 0 and stages["d2h"] > 0
    _report("pinned_copies", host_allocator_changes=grew, **{f"{k}_us": v / 1e3 for k, v in stages.items()})


def test_shape_buckets_are_warmed_before_serving(repository, device):
    """enc_warm pads batches to multiples of 32 and warms (rows, length) shapes at load."""
    repo, _ = repository
    with running_server(repo, "--device", device, "--model", "enc_warm") as server:
        assert "enc_warm: warmed 4 batch shapes" in server.log()
        with InferenceClient(server.address) as client:
            # 8 rows of length 40 -> one batch padded to 64: a warmed shape
            rows = [np.full((1, 40), 7, np.int64) for _ in range(8)]
            started = time.perf_counter()
            results = list(client.stream("enc_warm", [{"tokens": r} for r in rows], window=8))
            warm_s = time.perf_counter() - started
            # a shape nobody warmed: 5 rows of 200 -> 224
            cold = [np.full((1, 200), 7, np.int64) for _ in range(5)]
            started = time.perf_counter()
            list(client.stream("enc_warm", [{"tokens": r} for r in cold], window=8))
            cold_s = time.perf_counter() - started
            stats = client.model_statistics("enc_warm").model_stats[0]
    assert all(r["states"].shape == (1, 40, 64) for r in results)  # cut back from the padded 64
    assert stats.inference_count == 13
    _report("shape_warmup", warmed_shape_first_call_s=warm_s, cold_shape_first_call_s=cold_s)


OOM_MODEL = '''
import numpy as np
import torch


class Model:
    """Allocates `row_mib` MiB per row on the GPU, under a memory cap set at load: a real
    torch.cuda.OutOfMemoryError above `rows_that_fit` rows."""

    def load(self, context):
        self.row_bytes = int(context.parameters["row_mib"]) * 2**20
        fits = int(context.parameters["rows_that_fit"])
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction((fits + 0.5) * self.row_bytes / total, 0)
        self.sizes = []

    def predict(self, inputs):
        x = inputs["x"]
        block = torch.ones((x.shape[0], self.row_bytes // 4), device="cuda")  # OOM above the cap
        self.sizes.append(x.shape[0])
        result = x + float(block[0, 0].item())
        del block
        return {"y": result}
'''


@cuda_only
def test_a_real_cuda_out_of_memory_splits_the_batch(tmp_path):
    folder = tmp_path / "oom_gpu"
    folder.mkdir()
    (folder / "model.py").write_text(OOM_MODEL)
    (folder / "config.yaml").write_text(
        "name: oom_gpu\nbackend: python\nmax_batch_size: 16\nbatching: {max_queue_delay_ms: 200}\n"
        "parameters: {row_mib: 256, rows_that_fit: 3}\n"
        "inputs: [{name: x, datatype: FP32, shape: [2]}]\noutputs: [{name: y, datatype: FP32, shape: [2]}]\n"
    )
    x = np.arange(32, dtype=np.float32).reshape(16, 2)
    with running_server(tmp_path, "--device", "cuda:0") as server, InferenceClient(server.address) as client:
        out = client.infer("oom_gpu", {"x": x})
        stats = client.model_statistics("oom_gpu").model_stats[0]
        log = server.log()
    np.testing.assert_array_equal(out["y"], x + 1)
    assert "out of memory at 16 rows; halving" in log
    sizes = {b.batch_size for b in stats.batch_stats}
    assert max(sizes) <= 3 and stats.inference_count == 16, sizes
    _report("cuda_oom_split", batch_sizes=sorted(sizes))


@cuda_only
def test_count_auto_starts_one_server_per_gpu(repository, tmp_path):
    from tensorfleet.coordinator.fleet.local_fleet import LocalFleet

    repo, _ = repository
    fleet = LocalFleet(repo, "enc_fp32", "auto", "cuda", tmp_path / "fleet", [])
    try:
        addresses = fleet.start(timeout=180)
        assert len(addresses) == torch.cuda.device_count()
        gpus = []
        for address in addresses:
            with InferenceClient(address) as client:
                config = client.model_config("enc_fp32")
                gpus.extend(config.instance_group[0].gpus)
                assert client.infer("enc_fp32", {"tokens": np.ones((1, 4), np.int64)})["mean"].shape == (1, 64)
        assert sorted(gpus) == list(range(torch.cuda.device_count()))
    finally:
        fleet.stop()
    _report("count_auto", servers=len(addresses))
