"""An ESM-2-architecture protein encoder, with ESM-2's parameter naming and shapes.

Token embedding over the ESM alphabet (with ESM-2's token-dropout rescaling), rotary
position embeddings on queries and keys, pre-LayerNorm encoder layers (`self_attn_layer_norm`
-> attention -> residual, `final_layer_norm` -> fc1 -> GELU -> fc2 -> residual), and a
final `emb_layer_norm_after`. Real ESM-2 weights load from a local Hugging Face checkpoint
folder (see `checkpoint.py`); without one, weights are random from a fixed seed.

This file is also copied into each built model folder, so it imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: The ESM-2 alphabet (33 tokens): four specials, the residue letters, <null_1>, <mask>.
ALPHABET: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>",
)
CLS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 32
#: Residues per sequence ESM-2 was trained on: 1024 positions minus <cls> and <eos>.
MAX_RESIDUES = 1022

#: ESM-2 release shapes: name -> (layers, dim, heads). The FFN is 4 x dim.
SHAPES: dict[str, tuple[int, int, int]] = {
    "8M": (6, 320, 20),
    "35M": (12, 480, 20),
    "150M": (30, 640, 20),
    "650M": (33, 1280, 20),
}


@dataclass(frozen=True)
class ESM2Config:
    layers: int = 6
    dim: int = 320
    heads: int = 20
    ffn: int = 1280
    vocab: int = len(ALPHABET)
    layer_norm_eps: float = 1e-5
    token_dropout: bool = True

    @classmethod
    def shape(cls, name: str) -> ESM2Config:
        if name not in SHAPES:
            raise ValueError(f"unknown ESM-2 shape '{name}'; known: {', '.join(SHAPES)}")
        layers, dim, heads = SHAPES[name]
        return cls(layers=layers, dim=dim, heads=heads, ffn=4 * dim)

    def to_dict(self) -> dict:
        return asdict(self)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings over the head dimension (half-split rotation, base 10000)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(length, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: ESM2Config) -> None:
        super().__init__()
        if config.dim % config.heads:
            raise ValueError(f"dim {config.dim} is not divisible by {config.heads} heads")
        self.heads = config.heads
        self.head_dim = config.dim // config.heads
        self.q_proj = nn.Linear(config.dim, config.dim)
        self.k_proj = nn.Linear(config.dim, config.dim)
        self.v_proj = nn.Linear(config.dim, config.dim)
        self.out_proj = nn.Linear(config.dim, config.dim)
        self.rot_emb = RotaryEmbedding(self.head_dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        cos, sin = self.rot_emb(length, x.device)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class EncoderLayer(nn.Module):
    def __init__(self, config: ESM2Config) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.self_attn = SelfAttention(config)
        self.final_layer_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.dim, config.ffn)
        self.fc2 = nn.Linear(config.ffn, config.dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), keep)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class ESM2(nn.Module):
    """tokens int64 [B, T] (<cls> seq <eos> <pad>...) -> final hidden states [B, T, dim]."""

    def __init__(self, config: ESM2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab, config.dim, padding_idx=PAD)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers))
        self.emb_layer_norm_after = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = tokens != PAD
        x = self.embed_tokens(tokens)
        if self.config.token_dropout:
            # ESM-2 was trained with 15% x 80% of tokens masked; rescale as it does at inference.
            masked = tokens == MASK
            x = x.masked_fill(masked.unsqueeze(-1), 0.0)
            observed = masked.sum(-1).float() / keep.sum(-1).clamp(min=1).float()
            x = x * ((1 - 0.15 * 0.8) / (1 - observed))[:, None, None].to(x.dtype)
        x = x * keep.unsqueeze(-1).to(x.dtype)
        for layer in self.layers:
            x = layer(x, keep)
        return self.emb_layer_norm_after(x)


def build_random(config: ESM2Config, seed: int = 0) -> ESM2:
    """Fixed-seed random weights: the same seed and shape give the same model (built on CPU)."""
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = ESM2(config)
    # ESM-style initialisation scale, so activations stay O(1) through deep stacks.
    for name, param in model.named_parameters():
        if name.endswith("weight") and param.dim() == 2 and "embed" not in name:
            nn.init.normal_(param, std=1.0 / math.sqrt(param.shape[1]))
    return model.eval()


def pool(hidden: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden [B, T, dim] and residues per row -> (mean over residues [B, dim], residues [B, L, dim]).

    Residues sit at positions 1..length (after <cls>, before <eos>); the mean skips specials
    and padding. Row i of the per-residue output is valid for its first lengths[i] entries.
    """
    width = int(lengths.max()) if lengths.numel() else 0
    residues = hidden[:, 1 : 1 + width].float()
    valid = torch.arange(width, device=hidden.device)[None, :] < lengths[:, None]
    residues = residues * valid.unsqueeze(-1)
    mean = residues.sum(1) / lengths.clamp(min=1)[:, None].float()
    return mean, residues
