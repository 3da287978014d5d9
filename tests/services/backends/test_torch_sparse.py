"""A TorchScript model whose input declares `sparse: csr` gets a torch.sparse_csr_tensor, from CSR
tensors on the wire and from dense rows alike, with the same numbers as in-process."""

import hashlib

import numpy as np
import pytest
import scipy.sparse
import yaml

from tensorfleet.client import InferenceClient
from tensorfleet.core.sparse import csr_tensors
from tests.serving import running_server

torch = pytest.importorskip("torch")


class SparseProjection(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(12, 3), requires_grad=False)

    def forward(self, x: torch.Tensor):
        layout = torch.ones(1) if x.layout == torch.sparse_csr else torch.zeros(1)  # what the model was given
        return x.to_dense() @ self.weight, layout.expand(x.size(0))


def test_a_torchscript_model_gets_csr_rows_as_a_sparse_csr_tensor(tmp_path):
    torch.manual_seed(0)
    model = SparseProjection().eval()
    folder = tmp_path / "sparse_proj"
    folder.mkdir()
    torch.jit.save(torch.jit.script(model), str(folder / "model.pt"))
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "name": "sparse_proj", "backend": "torchscript", "model_file": "model.pt", "max_batch_size": 16,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [12], "sparse": "csr"}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [3]}, {"name": "csr", "datatype": "FP32", "shape": []}],
        "artifacts": {"model.pt": hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()},
        "warmup": [{"x": [0.0] * 12}],
    }))
    rng = np.random.default_rng(0)
    rows = ((rng.random((6, 12)) < 0.3) * rng.random((6, 12))).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(rows).to_sparse_csr())[0].numpy()
    with running_server(tmp_path) as server, InferenceClient(server.address, shared_memory=False) as client:
        sparse = client.infer("sparse_proj", csr_tensors("x", scipy.sparse.csr_matrix(rows), np.float32))
        dense = client.infer("sparse_proj", {"x": rows})
    for answer in (sparse, dense):
        assert np.all(answer["csr"] == 1.0)
        np.testing.assert_allclose(answer["y"], expected, rtol=1e-6, atol=1e-6)
