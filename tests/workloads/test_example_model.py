"""The bundled protein embedder: tokenizer, reproducible build, and served == in-process."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.serving import REPO_ROOT, running_server

pytest.importorskip("torch")

from examples.protein.fasta import read_fasta  # noqa: E402
from examples.protein.inprocess import load_python_model  # noqa: E402
from tensorfleet.client import InferenceClient  # noqa: E402
from tensorfleet.client.errors import InvalidArgument  # noqa: E402

MODEL_DIR = REPO_ROOT / "examples" / "models" / "protein_embedder"
BUILD = REPO_ROOT / "examples" / "build_models.py"
FASTA = REPO_ROOT / "examples" / "data" / "proteins.fasta"


def _model_module():
    spec = importlib.util.spec_from_file_location(
        "protein_embedder_model_under_test", MODEL_DIR / "model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(out: Path, *extra: str) -> Path:
    subprocess.run(
        [sys.executable, str(BUILD), "--out", str(out), *extra], check=True, cwd=REPO_ROOT
    )
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(items) -> np.ndarray:
    return np.array(list(items), dtype=object)


@pytest.fixture(scope="module")
def model_module():
    return _model_module()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A model repository with the default 8M-shaped embedder, built from scratch."""
    return _build(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def model(built):
    return load_python_model(built / "protein_embedder")


# --- tokenizer ---------------------------------------------------------------------------
def test_known_sequence_gets_esm_ids(model_module):
    tokens = model_module.tokenize(_rows([b"MKTLAGV"]))
    # <cls> M=20 K=15 T=11 L=4 A=5 G=6 V=7 <eos>, then <pad> up to 32
    assert tokens.shape == (1, 32)
    assert tokens.dtype == np.int64
    assert tokens[0, :9].tolist() == [0, 20, 15, 11, 4, 5, 6, 7, 2]
    assert (tokens[0, 9:] == 1).all()


def test_unknown_letters_become_unk_and_lowercase_is_accepted(model_module):
    tokens = model_module.tokenize(_rows([b"MJ*1 k", b"mkjxa"]))
    assert tokens[0, :8].tolist() == [0, 20, 3, 3, 3, 3, 15, 2]
    assert tokens[1, :7].tolist() == [0, 20, 15, 3, 24, 5, 2]  # x is X (24), a real letter


def test_str_rows_and_every_alphabet_letter(model_module):
    letters = model_module.RESIDUES
    tokens = model_module.tokenize(_rows([letters]))
    assert tokens[0, 1 : 1 + len(letters)].tolist() == list(range(4, 4 + len(letters)))


def test_lengths_pad_to_buckets_and_long_sequences_truncate(model_module):
    tokens = model_module.tokenize(_rows([b"A" * 30, b"G" * 3]))
    assert tokens.shape == (2, 32)  # 30 residues + cls + eos = 32
    assert model_module.tokenize(_rows([b"A" * 31])).shape == (1, 64)
    cut = model_module.tokenize(_rows([b"MKTAYIAKQR", b"MK"]), max_length=4, bucket=8)
    assert cut.tolist() == [[0, 20, 15, 11, 5, 2, 1, 1], [0, 20, 15, 2, 1, 1, 1, 1]]


def test_empty_sequence_is_rejected_by_row(model_module):
    with pytest.raises(InvalidArgument, match=r"rows \[1\] are empty"):
        model_module.tokenize(_rows([b"MK", b""]))


# --- the model ---------------------------------------------------------------------------
def test_output_is_float32_and_independent_of_batch_company(model):
    _, sequences = read_fasta(FASTA)
    batch = _rows(sequences[:6])
    together = model.predict({"sequence": batch})["embedding"]
    assert together.shape == (6, 320)
    assert together.dtype == np.float32
    alone = np.concatenate(
        [model.predict({"sequence": batch[i : i + 1]})["embedding"] for i in range(6)]
    )
    assert np.abs(together - alone).max() <= 1e-5
    assert np.abs(together[0] - together[1]).max() > 1e-3  # different proteins, different vectors


def test_same_seed_builds_identical_model_and_another_seed_does_not(built, model, tmp_path):
    again = _build(tmp_path / "again")
    assert _sha(again / "protein_embedder" / "encoder.pt") == _sha(
        built / "protein_embedder" / "encoder.pt"
    )
    assert (again / "protein_embedder" / "config.yaml").read_text() == (
        built / "protein_embedder" / "config.yaml"
    ).read_text()
    other = _build(tmp_path / "other", "--seed", "1")
    rows = {"sequence": _rows([b"MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"])}
    same = load_python_model(again / "protein_embedder").predict(rows)["embedding"]
    different = load_python_model(other / "protein_embedder").predict(rows)["embedding"]
    assert np.array_equal(same, model.predict(rows)["embedding"])
    assert np.abs(different - same).max() > 1e-3


def test_the_built_config_lists_the_checksums_of_the_built_files(built):
    """config.yaml is written with encoder.pt (not committed: TorchScript records source paths)."""
    import yaml

    folder = built / "protein_embedder"
    listed = yaml.safe_load((folder / "config.yaml").read_text())["artifacts"]
    assert listed == {name: _sha(folder / name) for name in ("model.py", "encoder.pt")}
    assert (MODEL_DIR / "model.py").read_bytes() == (folder / "model.py").read_bytes()


# --- served --------------------------------------------------------------------------------
def test_served_embeddings_equal_in_process(built, model):
    _, sequences = read_fasta(FASTA)
    sequences = sequences[:50]
    expected = model.predict({"sequence": _rows(sequences)})["embedding"]
    with (
        running_server(built, "--model", "protein_embedder") as server,
        InferenceClient(server.address) as client,
    ):
        metadata = client.model_metadata("protein_embedder")
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("embedding", "FP32", [-1, 320])
        ]
        one = client.infer("protein_embedder", {"sequence": [s.decode() for s in sequences[:7]]})
        requests = ({"sequence": _rows(sequences[i : i + 5])} for i in range(0, 50, 5))
        streamed = np.concatenate(
            [out["embedding"] for out in client.stream("protein_embedder", requests, window=4)]
        )
    assert one["embedding"].dtype == np.float32
    assert np.abs(one["embedding"] - expected[:7]).max() <= 1e-5
    assert streamed.shape == (50, 320)
    assert np.abs(streamed - expected).max() <= 1e-5


def test_per_residue_states_average_to_the_pooled_embedding_and_are_served_in_fp16(model, tmp_path):
    repo = _build(tmp_path / "residues", "--per-residue", "FP16")
    _, sequences = read_fasta(FASTA)
    batch = _rows(sorted(sequences[:12], key=len))
    per_residue = load_python_model(repo / "protein_embedder")
    states = per_residue.predict({"sequence": batch})["residues"]
    lengths = [min(len(s), 1022) for s in batch]
    assert states.dtype == np.float16 and states.shape[0] == 12 and states.shape[2] == 320
    pooled = model.predict({"sequence": batch})["embedding"]
    for row, length in enumerate(lengths):
        assert not states[row, length:].any()  # past its residues: zeros
        mean = states[row, :length].astype(np.float32).mean(axis=0)
        assert np.abs(mean - pooled[row]).max() < 2e-3  # fp16 rounding of each state
    with (
        running_server(repo, "--model", "protein_embedder") as server,
        InferenceClient(server.address) as client,
    ):
        alone = client.infer("protein_embedder", {"sequence": batch[3:4]})["residues"]
        together = client.infer("protein_embedder", {"sequence": batch})["residues"]
    assert alone.dtype == np.float16 and alone.shape == (1, lengths[3], 320)  # cut to its length
    assert together.shape == (12, max(lengths), 320)
    np.testing.assert_array_equal(together, states[:, : max(lengths)])
    assert np.abs(alone[0].astype(np.float32) - states[3, : lengths[3]]).max() < 1e-2
