"""examples/esm2 through backend transformers: a checkpoint saved by transformers' own
save_pretrained (EsmForMaskedLM, LayerNorms written as gamma/beta), served both ways from one
server: `build.py --backend transformers` (the folder itself) and `build.py --from-hf` (the
hand-written encoder, which now reads those names). Same rows, the same outputs within 1e-5
(fp32, CPU; two implementations of the same arithmetic), and both equal transformers in-process.
"""

from __future__ import annotations

import sys

import numpy as np

from tensorfleet.client import InferenceClient
from tests.hf_checkpoints import load_reference, reference_embed, save_esm2
from tests.serving import REPO_ROOT, launch_server

sys.path.insert(0, str(REPO_ROOT))
from examples.esm2 import build  # noqa: E402

TOLERANCE = 1e-5
ROWS = ["MKTAYIAKQRQISFVKSHFSRQ", "MKT", "acdefghiklmnpqrstvwy", "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF"]


def test_transformers_backend_equals_the_hand_written_encoder_on_the_same_checkpoint(tmp_path):
    checkpoint = save_esm2(tmp_path / "hf", seed=11)
    repo = tmp_path / "models"
    build.main(["--from-hf", str(checkpoint), "--out", str(repo), "--name", "esm2", "--max-length", "100"])
    build.main(["--backend", "transformers", "--from-hf", str(checkpoint), "--out", str(repo), "--name", "esm2_hf",
                "--max-length", "100"])
    server = launch_server(repo, "--threads", "1")
    try:
        with InferenceClient(server.address) as client:
            hand = client.infer("esm2", {"sequence": ROWS})
            served = client.infer("esm2_hf", {"sequence": ROWS})
    finally:
        server.stop()
    model, tokenizer = load_reference(checkpoint, "EsmModel")
    for row, text in enumerate(ROWS):
        alone = reference_embed(model, tokenizer, [text.upper()])  # case: upper, as the config says
        length = len(text)
        assert served["length"][row] == hand["length"][row] == length
        np.testing.assert_allclose(served["mean"][row], hand["mean"][row], rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(served["per_token"][row][:length], hand["per_residue"][row][:length],
                                   rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(served["mean"][row], alone["mean"][0], rtol=0, atol=TOLERANCE)
