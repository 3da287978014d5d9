"""Workload 1 (ESM-2 protein embeddings): FASTA -> HDF5 with mean and per-residue outputs.

The example serves an `EsmModel` checkpoint folder through backend `transformers` (no encoder
code of ours). The test saves a tiny ESM-2 with transformers' own `save_pretrained`
(EsmForMaskedLM, fixed seed: the folder a scientist downloads, LayerNorms written as
`gamma`/`beta`), builds the model folder from it with `examples/esm2/build.py --from-hf`, runs
`tensorfleet run` with `local.count: auto` on the CPU, and compares every row with transformers
in-process, each sequence run alone. Tolerance 1e-5 absolute (fp32, CPU): the server pads a
sub-batch's rows together, the reference runs each alone, so sums over the padded width may
round differently (tests/services/backends/test_transformers_backend.py holds the bitwise
comparison for the same batch).
"""

from __future__ import annotations

import json
import random
import shutil
import sys

import h5py
import numpy as np
import pytest

from tensorfleet.client import InferenceClient
from tests.hf_checkpoints import load_reference, reference_embed, save_esm2, save_gene_bert
from tests.serving import launch_server

from .helpers import REPO_ROOT, run_tensorfleet, write_yaml

sys.path.insert(0, str(REPO_ROOT))
from examples.esm2 import build  # noqa: E402

TOLERANCE = 1e-5
MAX_LENGTH = 40
OVER = "over_long"
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "MKTAYIAKQR"]


def embed_alone(reference, sequence: str, max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """The reference: one sequence (upper-case, its first max_length residues), no padding."""
    model, tokenizer = reference
    out = reference_embed(model, tokenizer, [sequence.upper()[:max_length]])
    return out["mean"][0], out["per_token"][0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("esm2")
    folder = save_esm2(root / "hf", seed=7)
    return root, folder, load_reference(folder, "EsmModel")


@pytest.fixture(scope="module")
def example(checkpoint):
    root, folder, reference = checkpoint
    assert build.main(["--from-hf", str(folder), "--out", str(root / "models"), "--max-length", str(MAX_LENGTH),
                       "--token-budget", "256", "--max-batch-size", "16"]) == 0
    rng = random.Random(3)
    records = [(f"p{i}", "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(3, MAX_LENGTH))))
               for i in range(26)]
    records[5] = (records[5][0], records[5][1].lower())
    records.insert(11, (OVER, "M" * (MAX_LENGTH + 5)))
    (root / "proteins.fasta").write_text("".join(f">{key}\n{seq}\n" for key, seq in records))
    job = write_yaml(root / "esm2.yaml", {
        "name": "esm2",
        "input": {"path": "proteins.fasta", "over_length": "error"},
        "model": {"name": "esm2", "local": {"repository": "models", "count": "auto", "args": ["--threads", "1"]}},
        "output": {"path": "out/embeddings.h5", "tensors": {"mean": "mean", "per_token": "per_residue"},
                   "ragged": {"per_token": "length"}},
        "chunking": {"chunk_rows": 8, "batch_rows": 5, "token_budget": 160},
    })
    done = run_tensorfleet("run", job)
    return root, reference, records, done


@pytest.fixture(scope="module")
def served(checkpoint):
    """One server over the other builds: truncation at 12 residues, FP16 per-residue states, a
    checkpoint folder without tokenizer files, and a random model built at a small shape."""
    root, folder, reference = checkpoint
    repo = root / "more"
    bare = root / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(folder / name, bare / name)
    builds = {
        "esm2_trunc": ["--from-hf", str(folder), "--max-length", "12"],
        "esm2_half": ["--from-hf", str(folder), "--max-length", "12", "--per-residue-dtype", "FP16"],
        "esm2_bare": ["--from-hf", str(bare), "--max-length", "100"],
        "esm2_random": ["--layers", "2", "--dim", "32", "--heads", "4", "--seed", "5", "--max-length", "100"],
    }
    for name, args in builds.items():
        assert build.main([*args, "--out", str(repo), "--name", name]) == 0
    server = launch_server(repo, "--threads", "1")
    try:
        with InferenceClient(server.address) as client:
            yield repo, reference, client
    finally:
        server.stop()


def test_the_checkpoint_is_as_transformers_writes_it(checkpoint):
    """The case the old hand-written reader refused: LayerNorm weights under their old names,
    as transformers' save_pretrained writes them; the served model lets transformers read them."""
    _, folder, _ = checkpoint
    header = (folder / "model.safetensors").read_bytes()
    names = json.loads(header[8 : 8 + int.from_bytes(header[:8], "little")])
    assert any(name.endswith("LayerNorm.beta") for name in names), sorted(names)[:10]


def test_fasta_to_hdf5_mean_and_per_residue_match_transformers_in_process(example):
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
        table = {name: f["errors"][name][:] for name in ("row", "id", "message")}
    assert ok.sum() == len(records) - 1 and not ok[over]
    assert table["row"].tolist() == [over] and table["id"][0].decode() == OVER
    message = table["message"][0].decode()
    assert "45" in message and str(MAX_LENGTH) in message and "over_length" in message, message
    assert error[over]
    assert np.isnan(mean[over]).all() and offsets[over] == offsets[over + 1]


def test_count_auto_starts_one_server_on_the_cpu(example):
    root, *_ = example
    servers = json.loads((root / "out" / "embeddings.h5.tfjob" / "servers" / "servers.json").read_text())
    assert len(servers) == 1


def test_truncate_policy_keeps_the_first_max_length_residues(served):
    _, reference, client = served
    out = client.infer("esm2_trunc", {"sequence": SEQUENCES})
    assert out["length"].tolist() == [12, 10]
    assert out["per_token"].shape == (2, 12, 32)
    for row, sequence in enumerate(SEQUENCES):
        want_mean, want = embed_alone(reference, sequence, max_length=12)
        np.testing.assert_allclose(out["per_token"][row, : len(want)], want, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(out["mean"][row], want_mean, atol=TOLERANCE, rtol=0)
    assert not out["per_token"][1, 10:].any()
    # a job that keeps only the mean: the per-residue states are left out, the mean is the same
    means_only = client.infer("esm2_trunc", {"sequence": SEQUENCES}, outputs=["mean"])
    assert "per_token" not in means_only
    np.testing.assert_array_equal(means_only["mean"], out["mean"])
    # per_token declared FP16: the same values to fp16 precision, half the bytes on the wire
    half = client.infer("esm2_half", {"sequence": SEQUENCES})
    assert half["per_token"].dtype == np.float16
    np.testing.assert_array_equal(half["per_token"], out["per_token"].astype(np.float16))
    np.testing.assert_array_equal(half["mean"], out["mean"])


def test_a_checkpoint_without_tokenizer_files_gets_the_esm_alphabet(served):
    repo, reference, client = served
    config = (repo / "esm2_bare" / "config.yaml").read_text()
    assert "tokenizer: tokenizer" in config and (repo / "esm2_bare" / "tokenizer" / "vocab.txt").is_file()
    out = client.infer("esm2_bare", {"sequence": SEQUENCES})
    for row, sequence in enumerate(SEQUENCES):
        want_mean, want = embed_alone(reference, sequence, max_length=100)
        np.testing.assert_allclose(out["mean"][row], want_mean, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(out["per_token"][row, : len(want)], want, atol=TOLERANCE, rtol=0)


def test_a_random_shape_is_reproducible_and_served_as_transformers_computes_it(served, tmp_path):
    repo, _, client = served
    again = tmp_path / "again"
    assert build.main(["--layers", "2", "--dim", "32", "--heads", "4", "--seed", "5", "--max-length", "100",
                       "--out", str(again), "--name", "esm2_random"]) == 0
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        assert (again / "esm2_random" / "checkpoint" / name).read_bytes() == (
            repo / "esm2_random" / "checkpoint" / name).read_bytes(), name
    reference = load_reference(repo / "esm2_random" / "checkpoint", "EsmModel")
    out = client.infer("esm2_random", {"sequence": SEQUENCES})
    for row, sequence in enumerate(SEQUENCES):
        want_mean, want = embed_alone(reference, sequence, max_length=100)
        np.testing.assert_allclose(out["mean"][row], want_mean, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(out["per_token"][row, : len(want)], want, atol=TOLERANCE, rtol=0)


def test_build_names_what_is_wrong(checkpoint, tmp_path, capsys):
    _, folder, _ = checkpoint
    bert = save_gene_bert(tmp_path / "bert")
    cases = [
        (["--from-hf", str(bert)], "model_type is 'bert', not 'esm'"),
        (["--from-hf", str(tmp_path)], "no config.json"),
        (["--from-hf", str(folder), "--max-length", "500"], "--max-length 500: this checkpoint takes 1..128 residues"),
        (["--dim", "30", "--heads", "4"], "--dim 30 is not divisible by 4 heads"),
    ]
    for args, message in cases:
        assert build.main([*args, "--out", str(tmp_path / "models")]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "models" / "esm2").exists()


@pytest.mark.parametrize("name", sorted(build.SHAPES))
def test_release_shapes_have_their_parameter_counts(name):
    import torch
    import transformers

    config = build.esm_config(name)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == build.SHAPES[name]
    with torch.device("meta"):
        params = sum(p.numel() for p in transformers.EsmModel(config, add_pooling_layer=False).parameters())
    nominal = float(name.removesuffix("M")) * 1e6
    assert 0.9 * nominal < params < 1.05 * nominal
