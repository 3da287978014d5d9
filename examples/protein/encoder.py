"""An ESM-2-shaped protein encoder with fixed-seed random weights.

Real ESM-2 weights cannot be downloaded here, so the example model is built locally from
`torch.manual_seed`: the architecture and cost per token match ESM-2 of the same size
(token embedding over the ESM alphabet, pre-LayerNorm encoder layers, final LayerNorm),
the embeddings carry no biology. Rotary position embeddings are replaced by learned
absolute positions so that the layers stay plain `nn.TransformerEncoderLayer`s, which
TorchScript compiles and which keep torch's fused inference path.

The module owns the mean pooling: `forward` returns one float32 vector per sequence,
averaged over real residues (not <cls>, <eos> or <pad>), so only [rows, dim] leaves the
device. `residues` returns the per-residue states instead, [rows, T - 2, dim] in the compute
dtype, with zeros wherever a row has no residue (its <eos> and padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: The ESM alphabet: four specials, then the residue letters in ESM's order.
SPECIALS = ("<cls>", "<pad>", "<eos>", "<unk>")
RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO.-"
ALPHABET: tuple[str, ...] = (*SPECIALS, *RESIDUES, "<null_1>", "<mask>")
CLS, PAD, EOS, UNK = 0, 1, 2, 3
#: Longest input in tokens, <cls> and <eos> included (ESM-2: 1022 residues + 2).
MAX_POSITIONS = 1024


@dataclass(frozen=True)
class EncoderShape:
    layers: int = 6
    dim: int = 320
    heads: int = 20
    ffn: int = 0  # 0 = 4 x dim, as in ESM-2

    @property
    def ffn_dim(self) -> int:
        return self.ffn or 4 * self.dim


class ProteinEncoder(nn.Module):
    """tokens [B, T] int64 -> mean-pooled embeddings [B, dim] float32."""

    __constants__ = ["cls_id", "pad_id", "eos_id"]

    def __init__(self, shape: EncoderShape) -> None:
        super().__init__()
        self.cls_id, self.pad_id, self.eos_id = CLS, PAD, EOS
        self.embed_tokens = nn.Embedding(len(ALPHABET), shape.dim, padding_idx=PAD)
        self.embed_positions = nn.Embedding(MAX_POSITIONS, shape.dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=shape.dim,
                nhead=shape.heads,
                dim_feedforward=shape.ffn_dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(shape.layers)
        )
        self.final_norm = nn.LayerNorm(shape.dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden(tokens).float()
        weights = self._is_residue(tokens).to(hidden.dtype).unsqueeze(-1)
        counts = weights.sum(dim=1).clamp(min=1.0)
        return (hidden * weights).sum(dim=1) / counts

    @torch.jit.export
    def residues(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> [B, T - 2, dim]: position i holds residue i (after <cls>)."""
        hidden = self._hidden(tokens)
        weights = self._is_residue(tokens).to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights)[:, 1 : tokens.shape[1] - 1]

    def _hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        padding = tokens == self.pad_id
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        hidden = self.embed_tokens(tokens) + self.embed_positions(positions)
        for layer in self.layers:
            hidden = layer(hidden, src_key_padding_mask=padding)
        return self.final_norm(hidden)

    def _is_residue(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens != self.cls_id) & (tokens != self.eos_id) & (tokens != self.pad_id)


def build_encoder(shape: EncoderShape, seed: int = 0) -> torch.jit.ScriptModule:
    """The same seed and shape always give the same weights (built on CPU)."""
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = ProteinEncoder(shape).eval()
    return torch.jit.script(model)
