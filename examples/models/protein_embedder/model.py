"""Protein embedder (python backend): BYTES sequences in, mean-pooled embeddings out.

Tokenization runs on the server so clients send plain sequences. The weights in
`encoder.pt` are random with a fixed seed (built by `examples/build_models.py`; real
ESM-2 weights cannot be downloaded here), so the vectors are reproducible, not meaningful.

Policies:
- Alphabet: ESM's. Lowercase letters are accepted; any other byte maps to <unk>.
- Length: sequences longer than `parameters.max_length` residues (at most 1022) are
  truncated to their first `max_length` residues; the embedding averages those only.
  An empty sequence is rejected (INVALID_ARGUMENT) because it has no residue to average.
- Shapes: every batch is padded to a length that is a multiple of `batching.length_bucket`,
  so the device sees few distinct shapes (each new shape costs a CUDA warm-up).
- Precision: fp32 by default; on CUDA, fp16 / bf16 run under autocast. CPU always runs
  fp32. The output is float32 whatever the compute precision.
- Output: `embedding` [rows, dim], mean-pooled; or, when the config declares an output
  `residues` (shape [-1, dim], ragged; FP16 or FP32), the per-residue states, narrowed to
  that datatype on the device. Residue i of a sequence is position i; positions past its
  (truncated) length are zero, and the server cuts each request back to its longest sequence.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from tensorfleet.client.errors import InvalidArgument
from tensorfleet.services.backends.torch_common import StageClock

log = logging.getLogger("tensorfleet.examples.protein_embedder")

#: The ESM alphabet: <cls>=0, <pad>=1, <eos>=2, <unk>=3, then the residue letters.
CLS, PAD, EOS, UNK = 0, 1, 2, 3
RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO.-"
MAX_RESIDUES = 1022  # 1024 positions minus <cls> and <eos>


def lookup_table() -> np.ndarray:
    """byte value -> token id; unknown bytes -> <unk>, lowercase letters as uppercase."""
    table = np.full(256, UNK, dtype=np.int64)
    for offset, letter in enumerate(RESIDUES, start=4):
        table[ord(letter)] = offset
        if letter.isalpha():
            table[ord(letter.lower())] = offset
    return table


_TABLE = lookup_table()


def _as_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, (bytearray, memoryview, np.bytes_)):
        return bytes(item)
    raise InvalidArgument(f"input 'sequence': expected bytes, got {type(item).__name__}")


def tokenize(sequences: np.ndarray, max_length: int = MAX_RESIDUES, bucket: int = 32) -> np.ndarray:
    """Rows of bytes -> int64 [rows, T] with <cls> ... <eos> <pad>...; T a multiple of `bucket`.

    One table lookup over the concatenated bytes and one scatter: no per-residue Python.
    """
    items = [_as_bytes(item) for item in np.asarray(sequences, dtype=object).reshape(-1)]
    lengths = np.fromiter((len(item) for item in items), dtype=np.int64, count=len(items))
    if len(items) and lengths.min() == 0:
        empty = np.flatnonzero(lengths == 0).tolist()
        raise InvalidArgument(f"input 'sequence': rows {empty} are empty; a protein needs residues")
    kept = np.minimum(lengths, max_length)
    width = int(kept.max(initial=0)) + 2
    width = -(-width // bucket) * bucket
    tokens = np.full((len(items), width), PAD, dtype=np.int64)
    if not items:
        return tokens
    tokens[:, 0] = CLS
    codes = _TABLE[np.frombuffer(b"".join(items), dtype=np.uint8)]
    rows = np.repeat(np.arange(len(items)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    offsets = np.arange(codes.size) - starts
    keep = offsets < np.repeat(kept, lengths)
    tokens[rows[keep], offsets[keep] + 1] = codes[keep]
    tokens[np.arange(len(items)), kept + 1] = EOS
    return tokens


class Model:
    """The python-backend model class: load once, then predict batch after batch."""

    def load(self, context) -> None:
        self.device = torch.device(context.device)
        params = context.parameters or {}
        self.max_length = min(int(params.get("max_length", MAX_RESIDUES)), MAX_RESIDUES)
        if self.max_length < 1:
            raise InvalidArgument(
                f"parameters.max_length must be at least 1, got {self.max_length}"
            )
        self.bucket = int(context.config.batching.length_bucket) if context.config else 32
        self.preferred = (
            list(context.config.batching.preferred_batch_sizes) if context.config else []
        )
        self.token_budget = int(context.config.batching.token_budget) if context.config else 0
        outputs = {spec.name: spec.datatype for spec in context.config.outputs} if context.config else {}
        self.per_residue = "residues" in outputs
        self.residue_dtype = torch.float16 if outputs.get("residues") == "FP16" else torch.float32
        self.autocast_dtype = None
        precision = context.precision or "fp32"
        if precision != "fp32":
            if self.device.type == "cuda":
                self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
            else:
                log.warning(
                    "precision %s is honoured on CUDA only; running fp32 on %s",
                    precision,
                    self.device,
                )
        with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export
            warnings.simplefilter("ignore", DeprecationWarning)
            self.encoder = torch.jit.load(
                str(context.artifact("encoder.pt")), map_location=self.device
            )
        self.encoder.eval()

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """int64 [rows, T] -> float32 [rows, dim], on this model's device and precision."""
        return self._run(self.encoder.forward, tokens, torch.float32)

    def residue_states(self, tokens: np.ndarray) -> np.ndarray:
        """int64 [rows, T] -> [rows, T - 2, dim] in the declared output datatype."""
        return self._run(self.encoder.residues, tokens, self.residue_dtype)

    def _run(self, method, tokens: np.ndarray, dtype: torch.dtype) -> np.ndarray:
        clock = StageClock(torch, self.device)  # the server shows these in ModelStatistics
        batch = torch.from_numpy(tokens)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        clock.mark("h2d")
        return self._compute(method, batch, dtype, clock)

    def _compute(self, method, batch: torch.Tensor, dtype: torch.dtype, clock: StageClock) -> np.ndarray:
        with torch.inference_mode():
            if self.autocast_dtype is not None:
                with torch.autocast(device_type="cuda", dtype=self.autocast_dtype):
                    result = method(batch)
            else:
                result = method(batch)
            clock.mark("compute")
            host = result.to(dtype).cpu().numpy()  # narrowed on the device: fewer bytes to copy
        clock.mark("d2h")
        self.stage_ns = clock.stages()
        return host

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = tokenize(inputs["sequence"], self.max_length, self.bucket)
        if self.per_residue:
            return {"residues": self.residue_states(tokens)}
        return {"embedding": self.embed_tokens(tokens)}

    # --- on a GPU the server tokenizes and copies the next batch while this one computes ---
    def can_stage(self) -> bool:
        return self.device.type == "cuda"

    def stage(self, inputs: dict[str, np.ndarray]):
        """Tokenize and start the copy on a side stream (the server's feeder thread)."""
        tokens = tokenize(inputs["sequence"], self.max_length, self.bucket)
        with torch.cuda.device(self.device):
            if getattr(self, "_copy_stream", None) is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            start, done = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            with torch.cuda.stream(self._copy_stream):
                start.record()
                batch = torch.from_numpy(tokens).pin_memory().to(self.device, non_blocking=True)
                done.record()
        return batch, start, done

    def predict_staged(self, staged) -> dict[str, np.ndarray]:
        batch, start, done = staged
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        batch.record_stream(compute)  # made on the copy stream: kept until compute is done
        clock = StageClock(torch, self.device)
        if self.per_residue:
            result = {"residues": self._compute(self.encoder.residues, batch, self.residue_dtype, clock)}
        else:
            result = {"embedding": self._compute(self.encoder.forward, batch, torch.float32, clock)}
        self.stage_ns = {"h2d": int(start.elapsed_time(done) * 1e6), **self.stage_ns}
        return result

    def warmup(self) -> None:
        """Run the shapes real batches will have, so the first requests pay no first-shape cost.

        On CUDA: every length bucket for the preferred row counts within the token budget.
        On CPU shapes cost nothing extra, so one small batch checks the model runs.
        """
        if self.device.type != "cuda":
            self.predict({"sequence": np.array([b"MKTAYIAKQR"], dtype=object)})
            return
        rows_options = sorted({1, *self.preferred})
        for width in range(self.bucket, MAX_RESIDUES + 2 + 1, self.bucket):
            for rows in rows_options:
                if self.token_budget and rows * width > self.token_budget and rows > 1:
                    continue
                tokens = np.full((rows, width), 4, dtype=np.int64)
                tokens[:, 0], tokens[:, -1] = CLS, EOS
                self.residue_states(tokens) if self.per_residue else self.embed_tokens(tokens)
        torch.cuda.synchronize(self.device)

    def unload(self) -> None:
        self.encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
