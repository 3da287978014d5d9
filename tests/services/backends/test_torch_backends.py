"""TorchScript and torch.export artifacts served for real, compared with the in-process model."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from tensorfleet.client import InferenceClient
from tests.inprocess import inprocess_server
from tests.serving import running_server

torch = pytest.importorskip("torch")


class TinyEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor):
        hidden = torch.tanh(self.proj(x)) * scale
        return hidden, hidden.sum(dim=1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_model(
    repo: Path, name: str, backend: str, filename: str, precision: str = "fp32", outputs: tuple = ("FP32", "FP32")
) -> None:
    config = {
        "name": name,
        "backend": backend,
        "model_file": filename,
        "max_batch_size": 16,
        "precision": precision,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [8]}, {"name": "scale", "datatype": "FP32", "shape": [1]}],
        "outputs": [
            {"name": "hidden", "datatype": outputs[0], "shape": [4]},
            {"name": "total", "datatype": outputs[1], "shape": []},
        ],
        "artifacts": {filename: _sha(repo / name / filename)},
        "warmup": [{"x": [0.0] * 8, "scale": [1.0]}],
    }
    (repo / name / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    repo = tmp_path_factory.mktemp("torch_repo")
    example = (torch.zeros(2, 8), torch.ones(2, 1))
    (repo / "scripted").mkdir()
    torch.jit.save(torch.jit.script(model), str(repo / "scripted" / "model.pt"))
    _write_model(repo, "scripted", "torchscript", "model.pt")
    (repo / "exported").mkdir()
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(model, example, dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(repo / "exported" / "model.pt2"))
    _write_model(repo, "exported", "torch_export", "model.pt2")
    (repo / "scripted_bf16").mkdir()
    torch.jit.save(torch.jit.script(model), str(repo / "scripted_bf16" / "model.pt"))
    _write_model(repo, "scripted_bf16", "torchscript", "model.pt", precision="bf16")
    (repo / "half_outputs").mkdir()
    torch.jit.save(torch.jit.script(model), str(repo / "half_outputs" / "model.pt"))
    _write_model(repo, "half_outputs", "torchscript", "model.pt", precision="bf16", outputs=("FP16", "BF16"))
    return repo, model


@pytest.fixture(scope="module")
def server(repository):
    repo, _ = repository
    with inprocess_server(repo) as process:
        yield process


@pytest.mark.parametrize("name", ["scripted", "exported"])
def test_served_outputs_equal_the_in_process_model(repository, server, name):
    _, model = repository
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    scale = rng.random((5, 1)).astype(np.float32)
    with torch.inference_mode():
        hidden, total = model(torch.from_numpy(x), torch.from_numpy(scale))
    with InferenceClient(server.address) as client:
        out = client.infer(name, {"x": x, "scale": scale})
        assert client.model_config(name).platform in ("pytorch_libtorch", "pytorch_export")
        only_total = client.infer(name, {"x": x, "scale": scale}, outputs=["total"])
    assert set(only_total) == {"total"}
    np.testing.assert_array_equal(only_total["total"], out["total"])
    np.testing.assert_allclose(out["hidden"], hidden.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["total"], total.numpy(), atol=1e-5)


def test_bf16_precision_runs_in_bf16_and_answers_fp32(repository, server):
    _, model = repository
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
    scale = np.ones((2, 1), np.float32)
    with torch.inference_mode():
        expected = model.to(torch.bfloat16)(torch.from_numpy(x).bfloat16(), torch.from_numpy(scale).bfloat16())[0].float()
        model.float()
    with InferenceClient(server.address) as client:
        out = client.infer("scripted_bf16", {"x": x, "scale": scale})
    assert out["hidden"].dtype == np.float32
    np.testing.assert_array_equal(out["hidden"], expected.numpy())


def test_fp16_and_bf16_outputs_leave_the_model_narrowed_and_keep_their_values(repository, server):
    _, model = repository
    x = np.random.default_rng(3).standard_normal((6, 8)).astype(np.float32)
    scale = np.full((6, 1), 3.0, np.float32)
    with torch.inference_mode():
        hidden, total = model.to(torch.bfloat16)(torch.from_numpy(x).bfloat16(), torch.from_numpy(scale).bfloat16())
        model.float()
    with InferenceClient(server.address) as client:
        out = client.infer("half_outputs", {"x": x, "scale": scale})
    assert out["hidden"].dtype == np.float16
    np.testing.assert_array_equal(out["hidden"], hidden.half().numpy())
    # BF16 arrives as float32 in the SDK: exactly the model's bf16 values, no second rounding
    np.testing.assert_array_equal(out["total"], total.float().numpy())


def test_a_checksum_mismatch_is_a_clear_load_error_and_others_keep_serving(repository, tmp_path):
    repo, _ = repository
    broken = tmp_path / "repo"
    broken.mkdir()
    for name in ("scripted", "exported"):
        (broken / name).mkdir()
        for item in (repo / name).iterdir():
            (broken / name / item.name).write_bytes(item.read_bytes())
    with open(broken / "exported" / "model.pt2", "ab") as handle:
        handle.write(b"tampered")
    with inprocess_server(broken) as srv, InferenceClient(srv.address) as client:
        index = {m.name: m for m in client.repository_index()}
        assert index["exported"].state == "UNAVAILABLE"
        assert "artifact model.pt2 has sha256" in index["exported"].reason
        assert index["scripted"].state == "READY"
        assert client.infer("scripted", {"x": np.zeros((1, 8), np.float32), "scale": np.ones((1, 1), np.float32)})
    assert "exported failed to load" in srv.log()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_server_matches_in_process(repository):
    repo, model = repository
    x = np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32)
    scale = np.ones((16, 1), np.float32)
    gpu_model = model.to("cuda", torch.bfloat16)
    with torch.inference_mode():
        expected = gpu_model(torch.from_numpy(x).cuda().bfloat16(), torch.from_numpy(scale).cuda().bfloat16())[0]
    with running_server(repo, "--device", "cuda:0", "--model", "scripted_bf16") as srv:
        with InferenceClient(srv.address) as client:
            out = client.infer("scripted_bf16", {"x": x, "scale": scale})
    np.testing.assert_allclose(out["hidden"], expected.float().cpu().numpy(), atol=1e-2)
