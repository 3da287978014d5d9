"""A small attention encoder over ragged token rows, written as a model repository.

Shared by the gpu-marked tests (tests/gpu) and the CPU stage-statistics test: it has what the
GPU path cares about (a ragged INT64 input padded per batch, a mean-pooled FP32 output and a
ragged per-token FP16 output narrowed on the device), and is small enough for any device.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import yaml

DIM, VOCAB = 64, 32


class TinyEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.scale = 1.0 / math.sqrt(DIM)
        self.value = torch.nn.Linear(DIM, DIM)
        self.ff = torch.nn.Sequential(torch.nn.Linear(DIM, 4 * DIM), torch.nn.GELU(), torch.nn.Linear(4 * DIM, DIM))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 [rows, T] (0 = padding) -> (mean over real tokens [rows, DIM], states [rows, T, DIM])."""
        mask = tokens != 0
        h = self.embed(tokens)
        scores = (h @ h.transpose(1, 2)) * self.scale
        scores = scores.masked_fill(~mask.unsqueeze(1), -1e4)
        h = h + torch.softmax(scores, dim=-1) @ self.value(h)
        h = h + self.ff(h)
        weights = mask.unsqueeze(-1).to(h.dtype)
        mean = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return mean, h


def build_model(seed: int = 0) -> TinyEncoder:
    torch.manual_seed(seed)
    return TinyEncoder().eval()


def write_model(
    repo: Path, name: str, model: TinyEncoder, precision: str = "fp32", batching: dict | None = None
) -> Path:
    """One TorchScript model folder with its config.yaml; returns the folder."""
    folder = repo / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(model), str(folder / "model.pt"))
    config = {
        "name": name,
        "backend": "torchscript",
        "max_batch_size": 32,
        "precision": precision,
        "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [-1], "ragged": True, "pad_value": 0}],
        "outputs": [
            {"name": "mean", "datatype": "FP32", "shape": [DIM]},
            {"name": "states", "datatype": "FP16", "shape": [-1, DIM], "ragged": True},
        ],
        "batching": {"max_queue_delay_ms": 5, "token_budget": 4096, **(batching or {})},
        "artifacts": {"model.pt": hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()},
        "warmup": [{"tokens": [1, 2, 3, 4, 5]}],
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def token_rows(count: int, seed: int = 1, shortest: int = 3, longest: int = 40) -> list[np.ndarray]:
    """`count` requests of one row each, random lengths, tokens 1..VOCAB-1 (0 is padding)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=(1, int(rng.integers(shortest, longest + 1)))) for _ in range(count)]


def reference(model: TinyEncoder, rows: np.ndarray, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The model run in-process on one request's rows: (mean, states) as float32 numpy."""
    placed = model.to(device, dtype)
    with torch.inference_mode():
        mean, states = placed(torch.from_numpy(rows).to(device))
    model.to("cpu", torch.float32)
    return mean.float().cpu().numpy(), states.float().cpu().numpy()
