"""The protein embedder as an MLServer custom runtime: the baseline of bench.serve_overhead.

Runs inside MLServer's own venv (`make mlserver-venv`), never beside tensorfleet: both register
a protobuf package named `inference`, so nothing here imports tensorfleet. It serves the same
artifacts as examples/models/protein_embedder (the TorchScript `encoder.pt` that
examples/build_models.py writes) with the same tokenization policy as that model's `model.py`
(ESM alphabet, lowercase accepted, other bytes <unk>, <cls> ... <eos> then <pad> to a multiple
of the length bucket, longer rows cut to `max_length`), and answers with the same output:
`embedding`, FP32 [rows, dim]. The bench checks that both servers' outputs match the
in-process loop, so a drift between the two tokenizers shows as max_abs_diff.

model-settings.json: `parameters.uri` is the model folder holding encoder.pt;
`parameters.extra` may set `max_length`, `length_bucket` and `threads` (torch intra-op threads).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse

CLS, PAD, EOS, UNK = 0, 1, 2, 3
ALPHABET = "LAGVSERTIDPKQNFYMHWCXBUZO.-"  # token ids 4, 5, ... in this order (ESM's)
LONGEST = 1022


def _token_of_byte() -> np.ndarray:
    table = np.full(256, UNK, dtype=np.int64)
    for token, letter in enumerate(ALPHABET, start=4):
        table[ord(letter)] = table[ord(letter.lower())] = token
    return table


TOKEN_OF_BYTE = _token_of_byte()


def tokenize(rows: list[bytes], max_length: int, bucket: int) -> np.ndarray:
    """bytes rows -> int64 [rows, width]: <cls>, residues (at most max_length), <eos>, <pad>s."""
    kept = [row[:max_length] for row in rows]
    if any(not row for row in kept):
        raise MLServerError("input 'sequence': empty rows; a protein needs residues", status_code=400)
    lengths = np.array([len(row) for row in kept], dtype=np.int64)
    width = -(-(int(lengths.max()) + 2) // bucket) * bucket
    tokens = np.full((len(kept), width), PAD, dtype=np.int64)
    tokens[:, 0] = CLS
    # one lookup over all residues, then each row's slice into place
    codes = TOKEN_OF_BYTE[np.frombuffer(b"".join(kept), dtype=np.uint8)]
    ends = np.cumsum(lengths)
    for index, (end, length) in enumerate(zip(ends.tolist(), lengths.tolist(), strict=True)):
        tokens[index, 1 : length + 1] = codes[end - length : end]
    tokens[np.arange(len(kept)), lengths + 1] = EOS
    return tokens


class ProteinEmbedder(MLModel):
    """BYTES `sequence` [rows] in, mean-pooled FP32 `embedding` [rows, dim] out."""

    async def load(self) -> bool:
        folder = Path(self.settings.parameters.uri)
        extra = self.settings.parameters.extra or {}
        self.max_length = min(int(extra.get("max_length", LONGEST)), LONGEST)
        self.bucket = int(extra.get("length_bucket", 32))
        torch.set_num_threads(int(extra.get("threads", os.environ.get("OMP_NUM_THREADS", 1))))
        self.encoder = torch.jit.load(str(folder / "encoder.pt"), map_location="cpu").eval()
        self.ready = True
        return self.ready

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        named = {request_input.name: request_input for request_input in payload.inputs}
        if "sequence" not in named:
            raise MLServerError(f"expected input 'sequence', got {sorted(named)}", status_code=400)
        # MLServer's NumpyCodec cannot decode BYTES (np.frombuffer with dtype "bytes"): its
        # StringCodec gives str rows, back to bytes here (the alphabet is ASCII)
        rows = [row.encode() for row in self.decode(named["sequence"], default_codec=StringCodec)]
        tokens = torch.from_numpy(tokenize(rows, self.max_length, self.bucket))
        with torch.inference_mode():
            embedding = self.encoder.forward(tokens).to(torch.float32).numpy()
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output("embedding", embedding)],
        )
