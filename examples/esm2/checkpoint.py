"""Hugging Face-format ESM-2 checkpoint folders: read (and, for tests, write) them without transformers.

A folder holds `config.json` (transformers' EsmConfig fields) and `model.safetensors` or
`pytorch_model.bin`, with keys in transformers' layout: `EsmModel` keys (`embeddings.*`,
`encoder.*`) or `EsmForMaskedLM` keys (the same under `esm.`, plus `lm_head.*`).
`hf_to_esm` maps them onto `esm2.ESM2`'s ESM-2 names; the LM head, contact head, pooler and
rotary `inv_freq` buffers (recomputed) are not needed for embeddings and are dropped.

safetensors files are read and written here from the format itself (8-byte little-endian
header size, a JSON header of dtype/shape/byte ranges, then the raw little-endian data),
so no extra package is needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .esm2 import ESM2, ESM2Config

_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

#: transformers EsmLayer name -> ESM-2 name, per layer.
_LAYER_KEYS = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_DROPPED = re.compile(r"(^|\.)(inv_freq|position_ids)$|^(pooler|contact_head|lm_head)\.")


class CheckpointError(Exception):
    """The folder is not an ESM-2 checkpoint this encoder can load; says what is wrong."""


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    body = memoryview(data)[8 + size :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, stop = entry["data_offsets"]
        flat = torch.frombuffer(bytearray(body[start:stop]), dtype=dtype) if stop > start else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(entry["shape"])
    return tensors


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name, tensor in tensors.items():
        raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    Path(path).write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks))


def config_from_hf(hf: dict) -> ESM2Config:
    if hf.get("model_type", "esm") != "esm":
        raise CheckpointError(f"config.json model_type is '{hf.get('model_type')}', not 'esm'")
    if hf.get("position_embedding_type", "rotary") != "rotary" or hf.get("emb_layer_norm_before"):
        raise CheckpointError("only ESM-2 checkpoints (rotary positions, no embedding LayerNorm) are supported")
    if hf.get("is_folding_model"):
        raise CheckpointError("ESMFold checkpoints are not supported; use an ESM-2 encoder checkpoint")
    return ESM2Config(
        layers=int(hf["num_hidden_layers"]),
        dim=int(hf["hidden_size"]),
        heads=int(hf["num_attention_heads"]),
        ffn=int(hf["intermediate_size"]),
        vocab=int(hf.get("vocab_size", 33)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        token_dropout=bool(hf.get("token_dropout", True)),
    )


def config_to_hf(config: ESM2Config) -> dict:
    return {
        "architectures": ["EsmForMaskedLM"], "model_type": "esm", "position_embedding_type": "rotary",
        "emb_layer_norm_before": False, "num_hidden_layers": config.layers, "hidden_size": config.dim,
        "num_attention_heads": config.heads, "intermediate_size": config.ffn, "vocab_size": config.vocab,
        "layer_norm_eps": config.layer_norm_eps, "token_dropout": config.token_dropout, "mask_token_id": 32,
        "pad_token_id": 1, "max_position_embeddings": 1026, "hidden_act": "gelu", "rope_theta": 10000.0,
    }


def hf_to_esm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers EsmModel / EsmForMaskedLM keys -> ESM2 module keys (unknown keys are an error)."""
    out, unknown = {}, []
    for key, value in state.items():
        name = key.removeprefix("esm.")
        # transformers 5 writes some LayerNorms' weight and bias under their old names
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
        if _DROPPED.search(name):
            continue
        if name == "embeddings.word_embeddings.weight":
            out["embed_tokens.weight"] = value
        elif name.startswith("encoder.emb_layer_norm_after."):
            out[name.removeprefix("encoder.")] = value
        elif (match := _LAYER.match(name)) and match.group(2) in _LAYER_KEYS:
            index, module, kind = match.groups()
            out[f"layers.{index}.{_LAYER_KEYS[module]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"keys this ESM-2 encoder does not know: {unknown[:5]} ({len(unknown)} in all)")
    return out


def esm_to_hf(state: dict[str, torch.Tensor], prefix: str = "esm.") -> dict[str, torch.Tensor]:
    """ESM2 module keys -> transformers keys (EsmForMaskedLM's `esm.` prefix by default)."""
    back = {v: k for k, v in _LAYER_KEYS.items()}
    out = {}
    for key, value in state.items():
        if key == "embed_tokens.weight":
            out[prefix + "embeddings.word_embeddings.weight"] = value
        elif key.startswith("emb_layer_norm_after."):
            out[prefix + "encoder." + key] = value
        else:
            _, index, rest = key.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            out[f"{prefix}encoder.layer.{index}.{back[module]}.{kind}"] = value
    return out


def load_hf_checkpoint(folder: Path | str) -> ESM2:
    """An ESM2 module (fp32, CPU, eval) from a local Hugging Face-format ESM-2 folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; expected a Hugging Face ESM-2 checkpoint folder")
    config = config_from_hf(json.loads(config_path.read_text()))
    if (folder / "model.safetensors").is_file():
        state = read_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    model = ESM2(config)
    mapped = {k: v.float() for k, v in hf_to_esm(state).items()}
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def save_hf_checkpoint(model: ESM2, folder: Path | str, fmt: str = "safetensors") -> Path:
    """Write `model` as a Hugging Face-format folder (EsmForMaskedLM keys, no LM head)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
    state = esm_to_hf({k: v.detach().clone() for k, v in model.state_dict().items()})
    if fmt == "safetensors":
        write_safetensors(folder / "model.safetensors", state)
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder
