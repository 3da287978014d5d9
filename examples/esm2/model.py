"""ESM-2 embedder (python backend, `build.py --backend python`): BYTES sequences in; mean,
per-residue (`per_token`, as backend transformers names it) and length out.

Copied into each model folder by `examples/esm2/build.py` next to `esm2.py` (the encoder)
and `weights.pt` (its state dict, ESM-2 names). Outputs per row:
- `mean` FP32 [dim]: the final hidden states averaged over the residues (not <cls>/<eos>).
- `per_token` FP32 or FP16 (as config.yaml declares it) [L, dim], ragged: one vector per
  residue kept, narrowed on the device. Rows of one reply are zero-padded to the longest;
  `length` says how many of each row's vectors are real.
- `length` INT32: residues kept for the row.

Parameters (config.yaml `parameters`):
- `max_length` (<= 1022): residues the model reads per sequence.
- `over_length`: `truncate` keeps the first `max_length` residues; `error` fails that row
  with INVALID_ARGUMENT (before anything reaches the device; the server then reruns the
  other requests of the batch, and the coordinator splits the request, so it fails alone).
Tokenization: ESM alphabet, lowercase accepted, other bytes -> <unk>; an empty sequence is
INVALID_ARGUMENT. Token-budget batching: rows are sorted by length and run in sub-batches
of at most `batching.token_budget` tokens (rows x padded width), widths rounded up to
`batching.length_bucket`. Precision: fp16 / bf16 run under autocast on CUDA; CPU runs fp32.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys

import numpy as np
import torch

from tensorfleet.client.errors import InvalidArgument

log = logging.getLogger("tensorfleet.examples.esm2")

CLS, PAD, EOS, UNK = 0, 1, 2, 3
RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO.-"
MAX_RESIDUES = 1022
POLICIES = ("truncate", "error")


def _lookup_table() -> np.ndarray:
    table = np.full(256, UNK, dtype=np.int64)
    for token, letter in enumerate(RESIDUES, start=4):
        table[ord(letter)] = token
        table[ord(letter.lower())] = token
    return table


_TABLE = _lookup_table()


def _as_bytes(item: object) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview, np.bytes_)):
        return bytes(item)
    if isinstance(item, str):
        return item.encode()
    raise InvalidArgument(f"input 'sequence': expected bytes, got {type(item).__name__}")


def check_lengths(items: list[bytes], max_length: int, policy: str) -> np.ndarray:
    """Residues kept per row; empty rows, and over-length rows under `error`, are INVALID_ARGUMENT."""
    lengths = np.fromiter((len(item) for item in items), dtype=np.int64, count=len(items))
    empty = np.flatnonzero(lengths == 0).tolist()
    if empty:
        raise InvalidArgument(f"input 'sequence': rows {empty} are empty; a protein needs residues")
    if policy == "error":
        over = np.flatnonzero(lengths > max_length)
        if over.size:
            raise InvalidArgument(
                f"input 'sequence': row {int(over[0])} of the request has {int(lengths[over[0]])} residues, over the "
                f"model's max_length {max_length} (parameters.over_length is 'error')"
            )
    return np.minimum(lengths, max_length)


def tokenize(items: list[bytes], kept: np.ndarray, bucket: int) -> np.ndarray:
    """<cls> residues <eos> <pad>...; the width is the longest row + 2, rounded up to `bucket`."""
    width = -(-(int(kept.max(initial=0)) + 2) // bucket) * bucket
    tokens = np.full((len(items), width), PAD, dtype=np.int64)
    tokens[:, 0] = CLS
    for row, (item, length) in enumerate(zip(items, kept, strict=True)):
        tokens[row, 1 : 1 + length] = _TABLE[np.frombuffer(item, dtype=np.uint8, count=int(length))]
        tokens[row, 1 + length] = EOS
    return tokens


def plan_batches(kept: np.ndarray, budget: int, bucket: int) -> list[np.ndarray]:
    """Row indices grouped by length so each group's rows x padded width stays within `budget`."""
    order = np.argsort(kept, kind="stable")
    groups: list[np.ndarray] = []
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order):
            width = -(-(int(kept[order[stop]]) + 2) // bucket) * bucket
            if budget and (stop + 1 - start) * width > budget:
                break
            stop += 1
        groups.append(order[start:stop])
        start = stop
    return groups


def _import_encoder(path):
    name = f"tensorfleet_esm2_{abs(hash(str(path)))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class Model:
    """Load once, then predict batch after batch."""

    def load(self, context) -> None:
        self.device = torch.device(context.device)
        params = context.parameters or {}
        self.max_length = int(params.get("max_length", MAX_RESIDUES))
        if not 1 <= self.max_length <= MAX_RESIDUES:
            raise InvalidArgument(f"parameters.max_length must be in 1..{MAX_RESIDUES}, got {self.max_length}")
        self.policy = str(params.get("over_length", "truncate"))
        if self.policy not in POLICIES:
            raise InvalidArgument(f"parameters.over_length must be one of {POLICIES}, got '{self.policy}'")
        batching = context.config.batching if context.config else None
        self.bucket = int(batching.length_bucket) if batching else 32
        self.token_budget = int(batching.token_budget) if batching else 0
        self.max_rows = int(context.config.max_batch_size) if context.config else 64
        self.autocast = None
        precision = context.precision or "fp32"
        if precision != "fp32":
            if self.device.type == "cuda":
                self.autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
            else:
                log.warning("precision %s is honoured on CUDA only; running fp32 on %s", precision, self.device)
        esm2 = _import_encoder(context.artifact("esm2.py"))
        config = esm2.ESM2Config(**json.loads(context.artifact("esm2.json").read_text()))
        self.encoder = esm2.ESM2(config)
        state = torch.load(context.artifact("weights.pt"), map_location="cpu", weights_only=True)
        self.encoder.load_state_dict(state)
        self.encoder = self.encoder.to(self.device).eval()
        self.pool = esm2.pool
        self.dim = config.dim
        declared = {spec.name: spec.datatype for spec in context.config.outputs} if context.config else {}
        half = declared.get("per_token") == "FP16"
        self.residue_dtype, self.residue_numpy = (torch.float16, np.float16) if half else (torch.float32, np.float32)

    def run(
        self, tokens: np.ndarray, kept: np.ndarray, residues: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens [rows, T] -> (mean [rows, dim], per-residue [rows, max(kept), dim] or None) as
        float32; without `residues` the per-residue states never leave the device."""
        batch = torch.from_numpy(tokens)
        lengths = torch.from_numpy(kept)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
            lengths = lengths.to(self.device, non_blocking=True)
        with torch.inference_mode():
            if self.autocast is not None:
                with torch.autocast(device_type="cuda", dtype=self.autocast):
                    hidden = self.encoder(batch)
            else:
                hidden = self.encoder(batch)
            mean, states = self.pool(hidden, lengths)
            return mean.cpu().numpy(), (states.to(self.residue_dtype).cpu().numpy() if residues else None)

    def predict(self, inputs: dict[str, np.ndarray], outputs: frozenset[str] | None = None) -> dict[str, np.ndarray]:
        """`outputs`: what the batch's requests asked for (None: all). A job that keeps only
        `mean` gets no per-residue states: not copied off the device, not sent."""
        items = [_as_bytes(item) for item in np.asarray(inputs["sequence"], dtype=object).reshape(-1)]
        kept = check_lengths(items, self.max_length, self.policy)
        rows = len(items)
        residues = outputs is None or "per_token" in outputs
        mean = np.zeros((rows, self.dim), dtype=np.float32)
        shape = (rows, int(kept.max(initial=0)), self.dim)
        per_residue = np.zeros(shape, dtype=self.residue_numpy) if residues else None
        for group in plan_batches(kept, self.token_budget, self.bucket):
            group_items = [items[i] for i in group]
            group_mean, group_residues = self.run(
                tokenize(group_items, kept[group], self.bucket), kept[group], residues
            )
            mean[group] = group_mean
            if per_residue is not None:
                per_residue[group, : group_residues.shape[1]] = group_residues
        result = {"mean": mean, "length": kept.astype(np.int32)}
        if per_residue is not None:
            result["per_token"] = per_residue
        return result

    def warmup(self) -> None:
        """CUDA: run every length bucket once at the row count the token budget allows."""
        if self.device.type != "cuda":
            self.predict({"sequence": np.array([b"MKTAYIAKQR"], dtype=object)})
            return
        for width in range(self.bucket, self.max_length + 2 + self.bucket, self.bucket):
            rows = max(1, min(self.max_rows, self.token_budget // width if self.token_budget else self.max_rows))
            tokens = np.full((rows, width), 4, dtype=np.int64)
            tokens[:, 0], tokens[:, -1] = CLS, EOS
            self.run(tokens, np.full(rows, width - 2, dtype=np.int64))
        torch.cuda.synchronize(self.device)

    def unload(self) -> None:
        self.encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
