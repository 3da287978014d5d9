"""examples/esm2's two builds on one checkpoint saved by transformers' own save_pretrained
(EsmForMaskedLM, LayerNorms written as gamma/beta): the default (backend transformers, the
folder itself) and `--backend python` (the hand-written encoder, kept while it measures faster
on the CPU). Served from one server: the same rows give the same outputs within 1e-5 (fp32, CPU;
two implementations of the same arithmetic: transformers' GELU is five tensor operations, the
hand-written one torch's fused kernel), and both equal transformers in-process.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from tensorfleet.client import InferenceClient
from tests.hf_checkpoints import load_reference, reference_embed, save_esm2
from tests.serving import REPO_ROOT, launch_server

sys.path.insert(0, str(REPO_ROOT))
from examples.esm2 import build  # noqa: E402
from examples.esm2.checkpoint import (  # noqa: E402
    CheckpointError,
    esm_to_hf,
    hf_to_esm,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from examples.esm2.esm2 import CLS, EOS, ESM2Config, build_random  # noqa: E402

TOLERANCE = 1e-5
ROWS = ["MKTAYIAKQRQISFVKSHFSRQ", "MKT", "acdefghiklmnpqrstvwy", "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF"]


def test_hand_written_build_equals_the_transformers_build_on_the_same_checkpoint(tmp_path):
    checkpoint = save_esm2(tmp_path / "hf", seed=11)
    repo = tmp_path / "models"
    assert build.main(["--from-hf", str(checkpoint), "--out", str(repo), "--name", "esm2", "--max-length", "100"]) == 0
    assert build.main(["--backend", "python", "--from-hf", str(checkpoint), "--out", str(repo), "--name", "esm2_hand",
                       "--max-length", "100"]) == 0
    server = launch_server(repo, "--threads", "1")
    try:
        with InferenceClient(server.address) as client:
            served = client.infer("esm2", {"sequence": ROWS})
            hand = client.infer("esm2_hand", {"sequence": ROWS})
    finally:
        server.stop()
    model, tokenizer = load_reference(checkpoint, "EsmModel")
    for row, text in enumerate(ROWS):
        alone = reference_embed(model, tokenizer, [text.upper()])
        length = len(text)
        assert served["length"][row] == hand["length"][row] == length
        np.testing.assert_allclose(served["mean"][row], hand["mean"][row], rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(served["per_token"][row][:length], hand["per_token"][row][:length],
                                   rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(hand["mean"][row], alone["mean"][0], rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(hand["per_token"][row][:length], alone["per_token"][0], rtol=0, atol=TOLERANCE)


def test_hand_written_reader_formats_key_mapping_and_errors(tmp_path):
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
