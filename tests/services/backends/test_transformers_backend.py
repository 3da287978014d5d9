"""Backend `transformers` on checkpoints saved by transformers itself, served by a real server.

Three architectures (ESM-2 EsmForMaskedLM, a BERT over gene tokens, a RoBERTa with a byte-level
BPE over DNA), one of them from a fake hub cache by repo id with a pinned revision. Each is
compared with transformers run in this process on the same rows: bitwise in fp32 when the server
runs the rows as one batch in the same order (one request, no token budget); within 1e-5 when
the batch composition differs (a row alone against the same row padded in a mixed batch).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tensorfleet.client import InferenceClient
from tensorfleet.core.errors import InvalidArgument, TensorfleetError
from tests.hf_checkpoints import (
    fake_hub_cache,
    load_reference,
    model_folder,
    reference_embed,
    save_dna_roberta,
    save_esm2,
    save_gene_bert,
)
from tests.serving import REPO_ROOT, launch_server

#: fp32 on the CPU, a row padded among longer rows vs the same row alone: attention sums over
#: a different (masked) width, so the last bits may differ.
TOLERANCE = 1e-5
OUTPUTS = ["mean", "cls", "last", "per_token", "length"]
ROWS = {
    "esm": ["MKTAYIAKQRQISFVKSHFSRQ", "MKT", "acdefghiklmnpq", "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMF"],
    "bert": ["GENE1 GENE2 GENE3", "GENE5", "GENE7 GENE9 GENE11 GENE0 GENE39", "GENE4 GENE4"],
    "rob": ["ACGTACGTAAGG", "ACGT", "GGGGCCCCAAAATTTTACGT", "TTTAAAC"],
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    checkpoints = {
        "esm": save_esm2(root / "ck" / "esm"),
        "bert": save_gene_bert(root / "ck" / "bert"),
        "rob": save_dna_roberta(root / "ck" / "rob"),
    }
    cache = root / "hub"
    commit = fake_hub_cache(cache, "lab/dna-roberta", checkpoints["rob"], revision="v1")
    repo = root / "repo"
    model_folder(repo, "esm", {"path": str(checkpoints["esm"])}, OUTPUTS)
    model_folder(repo, "bert", {"path": "../../ck/bert"}, OUTPUTS)  # relative to the model folder
    model_folder(repo, "rob", {"path": "lab/dna-roberta", "revision": "v1"}, OUTPUTS)
    model_folder(repo, "esm_budget", {"path": str(checkpoints["esm"]), "layer": 1}, ["mean", "per_token", "length"],
                 batching={"token_budget": 40, "length_bucket": 8, "pad_to_bucket": True, "warmup_shapes": [[2, 16]]},
                 warmup=[{"sequence": "MKTAYIAK"}])
    model_folder(repo, "esm_bf16", {"path": str(checkpoints["esm"])}, ["mean"], precision="bf16")
    model_folder(repo, "esm_strict", {"path": str(checkpoints["esm"]), "max_length": 12, "over_length": "error"},
                 ["mean"])
    # other weights, same config: a fingerprint that differs
    model_folder(repo, "esm_other", {"path": str(save_esm2(root / "ck" / "esm_other", seed=5))}, ["mean"])
    # models that must fail to load, each with its own reason; the others keep serving
    model_folder(repo, "missing_repo", {"path": "lab/not-cached"}, ["mean"])
    model_folder(repo, "wrong_width", {"path": str(checkpoints["esm"])}, ["mean"])
    (repo / "wrong_width" / "config.yaml").write_text(
        (repo / "wrong_width" / "config.yaml").read_text().replace("- 32", "- 48"))
    model_folder(repo, "bad_sum", {"path": str(checkpoints["esm"]), "checksums": {"config.json": "0" * 64}}, ["mean"])
    model_folder(repo, "code_outside", {"path": str(checkpoints["esm"]), "trust_remote_code": True}, ["mean"])
    server = launch_server(repo, "--threads", "1", env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    try:
        with InferenceClient(server.address) as client:
            yield root, checkpoints, client, commit, server
    finally:
        server.stop()


@pytest.mark.parametrize("name", ["esm", "bert", "rob"])
def test_one_batch_equals_transformers_in_process_bitwise(served, name):
    _, checkpoints, client, _, _ = served
    rows = ROWS[name]
    got = client.infer(name, {"sequence": rows})
    model, tokenizer = load_reference(checkpoints[name])
    want = reference_embed(model, tokenizer, rows)
    for output in ("mean", "cls", "last"):
        assert np.array_equal(got[output], want[output]), (name, output, np.abs(got[output] - want[output]).max())
    for row, states in enumerate(want["per_token"]):
        assert got["length"][row] == len(states)
        assert np.array_equal(got["per_token"][row][: len(states)], states)


def test_a_row_alone_equals_the_row_in_a_mixed_batch(served):
    _, _, client, _, _ = served
    for name in ("esm", "bert", "rob"):
        batch = client.infer(name, {"sequence": ROWS[name]})
        for row, text in enumerate(ROWS[name]):
            alone = client.infer(name, {"sequence": [text]})
            np.testing.assert_allclose(alone["mean"][0], batch["mean"][row], rtol=0, atol=TOLERANCE)
            length = int(alone["length"][0])
            np.testing.assert_allclose(alone["per_token"][0][:length], batch["per_token"][row][:length],
                                       rtol=0, atol=TOLERANCE)


def test_token_budget_sub_batches_and_a_chosen_layer_match_rows_run_alone(served):
    """esm_budget: 40 tokens per sub-batch (rows sorted by length, widths padded to 8), outputs
    from hidden state 1: each row equals transformers' hidden_states[1] of the row alone."""
    _, checkpoints, client, _, _ = served
    import torch

    model, tokenizer = load_reference(checkpoints["esm"])
    got = client.infer("esm_budget", {"sequence": ROWS["esm"]})
    for row, text in enumerate(ROWS["esm"]):
        encoded = tokenizer([text], return_tensors="pt")
        with torch.inference_mode():
            states = model(**encoded, output_hidden_states=True).hidden_states[1][0, 1:-1].numpy()
        np.testing.assert_allclose(got["mean"][row], states.mean(axis=0), rtol=0, atol=TOLERANCE)
        assert got["length"][row] == len(states)
        np.testing.assert_allclose(got["per_token"][row][: len(states)], states, rtol=0, atol=TOLERANCE)


def test_bf16_precision_loads_the_weights_in_bf16_and_answers_fp32(served):
    """Tolerance 1e-2: bf16 keeps 8 bits of mantissa; the server and transformers in-process, both
    in bf16, may still round differently where the batch is padded differently."""
    _, checkpoints, client, _, _ = served
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(str(checkpoints["esm"]), dtype=torch.bfloat16).eval()
    _, tokenizer = load_reference(checkpoints["esm"])
    want = reference_embed(model, tokenizer, ROWS["esm"])["mean"].astype(np.float32)
    got = client.infer("esm_bf16", {"sequence": ROWS["esm"]})["mean"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2)


def test_repo_id_resolves_in_the_hub_cache_at_its_pinned_revision(served):
    root, checkpoints, client, commit, _ = served
    snapshot = root / "hub" / "models--lab--dna-roberta" / "snapshots" / commit
    assert (snapshot / "model.safetensors").is_symlink()  # the layout huggingface_hub writes
    model, tokenizer = load_reference(snapshot)
    want = reference_embed(model, tokenizer, ROWS["rob"][:2])
    got = client.infer("rob", {"sequence": ROWS["rob"][:2]})
    assert np.array_equal(got["mean"], want["mean"])


def test_over_length_error_fails_that_row_with_a_clear_message(served):
    _, _, client, _, _ = served
    with pytest.raises(InvalidArgument, match=r"row 1 of the request has 32 tokens, over the model's max_length 12"):
        client.infer("esm_strict", {"sequence": ["MKT", "M" * 30]})
    assert client.infer("esm_strict", {"sequence": ["MKT"]})["mean"].shape == (1, 32)


def test_bad_rows_are_invalid_argument_and_the_server_stays_up(served):
    _, _, client, _, server = served
    with pytest.raises(InvalidArgument, match="row 0 is not UTF-8"):
        client.infer("esm", {"sequence": [b"\xff\xfe"]})
    with pytest.raises(InvalidArgument, match="trust_remote_code"):
        client.infer("esm", {"sequence": ["MKT"]}, parameters={"trust_remote_code": True})
    assert server.process.poll() is None
    assert client.infer("esm", {"sequence": ["MKT"]})["length"].tolist() == [3]


def test_load_errors_name_the_field(served):
    _, _, client, _, _ = served
    reasons = {}
    for name in ("missing_repo", "wrong_width", "bad_sum", "code_outside"):
        with pytest.raises(TensorfleetError) as caught:
            client.infer(name, {"sequence": ["MKT"]})
        reasons[name] = str(caught.value)
    assert "lab/not-cached is not in the local Hugging Face cache" in reasons["missing_repo"]
    assert "hidden size is 32" in reasons["wrong_width"]
    assert "config expects " + "0" * 64 in reasons["bad_sum"]
    assert "must be inside the model folder" in reasons["code_outside"]


def test_fingerprint_of_config_and_weights_is_in_the_model_provenance(served):
    """The sha256 the server reports (what outputs record) differs when only the weights differ."""
    _, _, client, _, _ = served
    first, second = _artifact_sha(client, "esm"), _artifact_sha(client, "esm_other")
    assert len(first) == 64 and len(second) == 64 and first != second


def _artifact_sha(client: InferenceClient, model: str) -> str:
    """What the coordinator records as the model's checksum in an output's provenance."""
    return client.model_config(model).parameters["artifact_sha256"].string_value


def test_server_without_transformers_serves_other_models_and_names_the_extra(tmp_path, served):
    """A `transformers` stub that fails to import stands for an environment without the extra;
    the server starts and serves its other models (here: `echo_bytes`, a python one)."""
    _, checkpoints, _, _, _ = served
    stub = tmp_path / "stub" / "transformers"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named transformers')\n")
    repo = tmp_path / "repo"
    model_folder(repo, "esm", {"path": str(checkpoints["esm"])}, ["mean"])
    shutil.copytree(REPO_ROOT / "tests" / "models" / "echo_bytes", repo / "echo_bytes")
    server = launch_server(repo, "--threads", "1", env={"PYTHONPATH": str(tmp_path / "stub")})
    try:
        with InferenceClient(server.address) as client:
            assert client.infer("echo_bytes", {"text": ["abc"]})["upper"].tolist() == [b"ABC"]
            with pytest.raises(TensorfleetError) as caught:
                client.infer("esm", {"sequence": ["MKT"]})
    finally:
        server.stop()
    assert "pip install 'tensorfleet[hf]'" in str(caught.value)
