"""Backend `transformers` with `tokenizer: none`: integer token ids in (ragged INT64, padded by
the batcher with the pad id), the same embeddings as transformers in-process on those ids."""

from __future__ import annotations

import numpy as np

from tensorfleet.client import InferenceClient
from tests.hf_checkpoints import load_reference, model_folder, reference_embed, save_gene_bert
from tests.serving import launch_server


def test_pre_tokenized_ids_equal_transformers_in_process(tmp_path):
    checkpoint = save_gene_bert(tmp_path / "bert")
    model, tokenizer = load_reference(checkpoint)
    texts = ["GENE1 GENE2 GENE3", "GENE5", "GENE7 GENE9 GENE11 GENE0 GENE39"]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    model_folder(tmp_path / "repo", "bert_ids", {"path": str(checkpoint), "tokenizer": "none"}, ["mean", "cls"],
                 input_spec={"name": "input_ids", "datatype": "INT64", "shape": [-1], "ragged": True,
                             "pad_value": tokenizer.pad_token_id})
    server = launch_server(tmp_path / "repo", "--threads", "1")
    try:
        with InferenceClient(server.address) as client:
            got = [client.infer("bert_ids", {"input_ids": np.array([row], dtype=np.int64)}) for row in ids]
    finally:
        server.stop()
    for row, text in enumerate(texts):
        want = reference_embed(model, tokenizer, [text])
        np.testing.assert_allclose(got[row]["mean"][0], want["mean"][0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got[row]["cls"][0], want["cls"][0], rtol=0, atol=1e-6)
