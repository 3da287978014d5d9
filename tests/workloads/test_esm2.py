"""Workload 1 (ESM-2 protein embeddings): FASTA -> HDF5 with mean and per-residue outputs.

The test saves a tiny ESM-2 checkpoint in Hugging Face layout (fixed seed), builds the model
folder from it with `examples/esm2/build.py`, runs `tensorfleet run` with `local.count: auto`
on the CPU, and compares the file with the checkpoint loaded in this process and run one
sequence at a time (no padding). Tolerance: 1e-4 absolute (float32; the server pads each
sub-batch, and masked attention over padding reorders the sums). The encoder itself was
checked once against transformers' EsmModel (max difference 2e-6); transformers is not a
test dependency.
"""

from __future__ import annotations

import json
import random
import sys

import h5py
import numpy as np
import pytest
import torch

from .helpers import REPO_ROOT, run_tensorfleet, write_yaml

sys.path.insert(0, str(REPO_ROOT))
from examples.esm2 import build  # noqa: E402
from examples.esm2.checkpoint import (  # noqa: E402
    CheckpointError,
    esm_to_hf,
    hf_to_esm,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from examples.esm2.esm2 import CLS, EOS, ESM2, SHAPES, ESM2Config, build_random  # noqa: E402
from examples.protein.inprocess import load_python_model  # noqa: E402

TOLERANCE = 1e-4
MAX_LENGTH = 40
TOKENS = {letter: index for index, letter in enumerate("LAGVSERTIDPKQNFYMHWCXBUZO.-", start=4)}
OVER = "over_long"


def embed_alone(model: ESM2, sequence: str, max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """The reference: one sequence, no padding, straight from the checkpoint."""
    kept = sequence.upper()[:max_length]
    tokens = torch.tensor([[CLS, *(TOKENS.get(c, 3) for c in kept), EOS]])
    with torch.inference_mode():
        hidden = model(tokens)[0, 1 : 1 + len(kept)].numpy()
    return hidden.mean(0), hidden


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("esm2")
    reference = build_random(ESM2Config(layers=2, dim=32, heads=4, ffn=128), seed=7)
    save_hf_checkpoint(reference, root / "hf")
    build.main(["--from-hf", str(root / "hf"), "--out", str(root / "models"), "--max-length", str(MAX_LENGTH),
                "--over-length", "error", "--token-budget", "256", "--max-batch-size", "16"])
    rng = random.Random(3)
    records = [(f"p{i}", "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(3, MAX_LENGTH))))
               for i in range(26)]
    records[5] = (records[5][0], records[5][1].lower())
    records.insert(11, (OVER, "M" * (MAX_LENGTH + 5)))
    (root / "proteins.fasta").write_text("".join(f">{key}\n{seq}\n" for key, seq in records))
    job = write_yaml(root / "esm2.yaml", {
        "name": "esm2",
        "input": {"path": "proteins.fasta", "over_length": "error"},  # the model's input declares max_length
        "model": {"name": "esm2", "local": {"repository": "models", "count": "auto", "args": ["--threads", "1"]}},
        "output": {"path": "out/embeddings.h5", "tensors": {"mean": "mean", "per_residue": "per_residue"},
                   "ragged": {"per_residue": "length"}},
        "chunking": {"chunk_rows": 8, "batch_rows": 5, "token_budget": 160},
    })
    done = run_tensorfleet("run", job)
    return root, reference, records, done


def test_fasta_to_hdf5_mean_and_per_residue_match_in_process(example):
    root, reference, records, done = example
    assert done.returncode == 1, done.stderr  # exit 1: rows failed (the over-length one), the rest written
    with h5py.File(root / "out" / "embeddings.h5") as f:
        ids = [value.decode() for value in f["ids"][:]]
        assert ids == [key for key, _ in records]
        ok, mean, flat, offsets = f["ok"][:], f["mean"][:], f["per_residue"][:], f["per_residue_offsets"][:]
        assert f["per_residue"].attrs["offsets"] == "per_residue_offsets"
    assert offsets.shape == (len(records) + 1,) and offsets[0] == 0 and offsets[-1] == len(flat)
    assert flat.shape == (sum(len(seq) for key, seq in records if key != OVER), 32)
    for row, (key, sequence) in enumerate(records):
        if key == OVER:
            continue
        assert ok[row], key
        want_mean, want_residues = embed_alone(reference, sequence)
        got = flat[offsets[row] : offsets[row + 1]]
        assert got.shape == want_residues.shape, key
        np.testing.assert_allclose(got, want_residues, atol=TOLERANCE, rtol=0, err_msg=key)
        np.testing.assert_allclose(mean[row], want_mean, atol=TOLERANCE, rtol=0, err_msg=key)


def test_over_length_row_with_error_policy_fails_alone(example):
    root, _, records, _ = example
    over = [key for key, _ in records].index(OVER)
    with h5py.File(root / "out" / "embeddings.h5") as f:
        ok, error, mean, offsets = f["ok"][:], f["error"][:], f["mean"][:], f["per_residue_offsets"][:]
        table = {name: f["errors"][name][:] for name in ("row", "id", "code", "message")}
    assert ok.sum() == len(records) - 1 and not ok[over]
    assert table["row"].tolist() == [over] and table["id"][0].decode() == OVER
    assert table["code"][0].decode() == "INVALID_ARGUMENT"
    # refused by the coordinator before sending (the input declares max_length), naming the length and limit
    assert "is 45 long" in table["message"][0].decode() and "at most 40" in table["message"][0].decode()
    assert error[over].decode().startswith("INVALID_ARGUMENT")
    assert np.isnan(mean[over]).all() and offsets[over] == offsets[over + 1]


def test_count_auto_starts_one_server_on_the_cpu(example):
    root, *_ = example
    servers = json.loads((root / "out" / "embeddings.h5.tfjob" / "servers" / "servers.json").read_text())
    assert len(servers) == 1


def test_truncate_policy_keeps_the_first_max_length_residues(example, tmp_path):
    root = example[0]
    build.main(["--from-hf", str(root / "hf"), "--out", str(tmp_path), "--max-length", "12"])
    model = load_python_model(tmp_path / "esm2")
    sequences = ["MKTAYIAKQRQISFVKSHFSRQ", "MKTAYIAKQR"]
    out = model.predict({"sequence": np.array([s.encode() for s in sequences], dtype=object)})
    assert out["length"].tolist() == [12, 10]
    assert out["per_residue"].shape == (2, 12, 32)
    for row, sequence in enumerate(sequences):
        want_mean, want = embed_alone(example[1], sequence, max_length=12)
        np.testing.assert_allclose(out["per_residue"][row, : len(want)], want, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(out["mean"][row], want_mean, atol=TOLERANCE, rtol=0)
    assert not out["per_residue"][1, 10:].any()
    # a job that keeps only the mean: the per-residue states are left out, the mean is the same
    means_only = model.predict(
        {"sequence": np.array([s.encode() for s in sequences], dtype=object)}, outputs=frozenset({"mean"})
    )
    assert "per_residue" not in means_only
    np.testing.assert_array_equal(means_only["mean"], out["mean"])
    # per_residue declared FP16: narrowed on the device, the same values to fp16 precision
    build.main(["--from-hf", str(root / "hf"), "--out", str(tmp_path / "half"), "--max-length", "12",
                "--per-residue-dtype", "FP16"])
    half = load_python_model(tmp_path / "half" / "esm2").predict(
        {"sequence": np.array([s.encode() for s in sequences], dtype=object)}
    )
    assert half["per_residue"].dtype == np.float16
    np.testing.assert_array_equal(half["per_residue"], out["per_residue"].astype(np.float16))
    np.testing.assert_array_equal(half["mean"], out["mean"])


def test_checkpoint_formats_and_key_mapping(tmp_path):
    model = build_random(ESM2Config(layers=2, dim=16, heads=2, ffn=64), seed=1)
    state = model.state_dict()
    assert hf_to_esm(esm_to_hf(state)).keys() == state.keys()
    tokens = torch.tensor([[CLS, 5, 6, 7, 32, EOS, 1, 1]])
    with torch.inference_mode():
        want = model(tokens)
        for fmt in ("safetensors", "bin"):
            loaded = load_hf_checkpoint(save_hf_checkpoint(model, tmp_path / fmt, fmt=fmt))
            assert torch.equal(loaded(tokens), want)
    (tmp_path / "bin" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not 'esm'"):
        load_hf_checkpoint(tmp_path / "bin")


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_release_shapes_have_their_parameter_counts(name):
    config = ESM2Config.shape(name)
    assert (config.layers, config.dim, config.heads) == SHAPES[name]
    with torch.device("meta"):
        params = sum(p.numel() for p in ESM2(config).parameters())
    nominal = float(name.removesuffix("M")) * 1e6
    assert 0.9 * nominal < params < 1.05 * nominal
