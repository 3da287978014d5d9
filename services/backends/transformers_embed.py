"""Backend `transformers`: a Hugging Face checkpoint served with no code (task `embed`).

The model folder's config.yaml names the checkpoint (`transformers.path`: a folder or a repo id
in the local cache) and the outputs it wants; the server tokenizes BYTES rows itself (special
tokens as the model expects) or takes integer ids (`tokenizer: none`). Outputs, per row:

- `mean`: the average over the row's real tokens, special tokens and padding excluded;
- `cls`: the first token's state; `last`: the last attended token's state;
- `per_token` [L, H], ragged, one vector per real non-special token, with `length` (INT32);
- `hidden_states` [L, H], ragged: the same for `transformers.hidden_states_layer`.

Rows are sorted by tokenized length and run in sub-batches whose rows x padded width stay
within `batching.token_budget` (widths rounded up to `length_bucket` with `pad_to_bucket`),
every sub-batch with its attention mask, so a row's embedding does not depend on what else was
in the batch. transformers is imported at load, so a server without the `hf` extra runs every
other backend and names the extra when a model asks for this one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from tensorfleet.core.errors import InvalidArgument

from .base import Backend, ModelContext
from .hf_checkpoint import EXTRA_HINT, checkpoint_fingerprint, resolve_checkpoint

log = logging.getLogger("tensorfleet.transformers")

POOLED = ("mean", "cls", "last")
RAGGED = ("per_token", "hidden_states")
KNOWN_OUTPUTS = (*POOLED, *RAGGED, "length")
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: The server loads its models in parallel threads; transformers' lazy module is not safe to
#: import from two at once (one thread sees a half-made module: "no attribute AutoModel").
_IMPORT_LOCK = threading.Lock()
#: A tokenizer's model_max_length above this is transformers' "no limit" placeholder.
_NO_LIMIT = 1_000_000


def import_transformers(what: str) -> Any:
    """transformers, or an InvalidArgument that names the extra to install."""
    try:
        import transformers
    except ImportError:
        raise InvalidArgument(f"{what}: backend 'transformers' is not installed here; {EXTRA_HINT}") from None
    return transformers


class TransformersBackend(Backend):
    def __init__(self, context: ModelContext) -> None:
        super().__init__(context)
        self.model: Any = None
        self.tokenizer: Any = None
        self._fingerprint = ""

    @property
    def what(self) -> str:
        return f"model '{self.context.config.name}'"

    # --- load ---------------------------------------------------------------------------
    def load(self) -> None:
        with _IMPORT_LOCK:
            self._load()

    def _load(self) -> None:
        config = self.context.config
        settings = config.transformers
        if settings is None:
            raise InvalidArgument(f"{self.what}: backend 'transformers' needs a `transformers:` section "
                                  "(at least `path:` a checkpoint folder or cached repo id)")
        if "trust_remote_code" in config.parameters:
            raise InvalidArgument(f"{self.what}: parameters.trust_remote_code is not read; the operator sets "
                                  "transformers.trust_remote_code in the model's config.yaml")
        transformers = import_transformers(self.what)
        transformers.utils.logging.disable_progress_bar()  # a server log is not a terminal
        import torch

        self._torch = torch
        folder = resolve_checkpoint(self.context.model_dir, settings, self.what)
        self._fingerprint = checkpoint_fingerprint(folder, settings.checksums, self.what)
        cls = getattr(transformers, settings.class_name, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise InvalidArgument(f"{self.what}: transformers has no model class '{settings.class_name}' "
                                  f"(transformers {transformers.__version__}); e.g. AutoModel, T5EncoderModel")
        dtype = getattr(torch, _DTYPES[self.context.precision])
        self.device = torch.device(self.context.device)
        try:
            model = cls.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=settings.trust_remote_code, dtype=dtype,
            )
        except ValueError as error:
            if "trust_remote_code" in str(error):
                raise InvalidArgument(
                    f"{self.what}: {folder} ships its own model code; the operator may allow it with "
                    "transformers.trust_remote_code: true in this config.yaml (see docs/security.md)"
                ) from None
            raise InvalidArgument(f"{self.what}: {cls.__name__} cannot load {folder}: {error}") from None
        self.model = model.to(self.device).eval()
        self.hidden = _hidden_size(self.model.config)
        self._load_tokenizer(transformers, folder, settings)
        self.max_length = self._max_length(settings.max_length)
        self._check_io()
        self.layer = settings.layer
        self.states_layer = settings.hidden_states_layer
        self.policy = settings.over_length
        batching = self.context.config.batching
        self.token_budget = batching.token_budget
        self.bucket = batching.length_bucket if batching.pad_to_bucket else 1
        log.info("%s: %s from %s (%s, hidden %d, max_length %d)", self.what, type(self.model).__name__, folder,
                 self.context.precision, self.hidden, self.max_length)

    def _load_tokenizer(self, transformers: Any, folder: Any, settings: Any) -> None:
        model_config = self.model.config
        specials = {getattr(model_config, f"{name}_token_id", None) for name in ("pad", "bos", "eos", "cls", "sep")}
        if (settings.tokenizer or "").lower() == "none":
            self.tokenizer = None
            spec = self.context.config.inputs[0]
            self.pad_id = int(spec.pad_value)
            # which ids are special ([CLS], [SEP], <s>...): the checkpoint's tokenizer knows, when it has one
            try:
                shipped = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                specials |= set(shipped.all_special_ids) - {shipped.unk_token_id}
            except (OSError, ValueError):
                log.info("%s: no tokenizer in %s; special ids from the model config only", self.what, folder)
        else:
            source = folder if settings.tokenizer is None else resolve_tokenizer(self.context.model_dir, settings)
            try:
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                    str(source), local_files_only=True, trust_remote_code=settings.trust_remote_code,
                )
            except (OSError, ValueError) as error:
                raise InvalidArgument(f"{self.what}: no tokenizer in {source} ({error}); name one with "
                                      "transformers.tokenizer, or `tokenizer: none` for integer token ids") from None
            self.pad_id = self.tokenizer.pad_token_id
            if self.pad_id is None:
                self.pad_id = getattr(model_config, "pad_token_id", None) or 0
        self.special_ids = np.array(sorted(i for i in specials if i is not None), dtype=np.int64)

    def _max_length(self, configured: int | None) -> int:
        model_config = self.model.config
        limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
        if limit and "roberta" in str(getattr(model_config, "model_type", "")):
            limit -= int(getattr(model_config, "pad_token_id", 1) or 0) + 1  # positions start after the pad id
        if self.tokenizer is not None and self.tokenizer.model_max_length < _NO_LIMIT:
            limit = min(limit or _NO_LIMIT, self.tokenizer.model_max_length)
        if configured is None:
            return int(limit or 512)
        if limit and configured > limit:
            raise InvalidArgument(f"{self.what}: transformers.max_length {configured} is over the model's "
                                  f"limit of {limit} tokens")
        return configured

    def _check_io(self) -> None:
        config = self.context.config
        if len(config.inputs) != 1:
            raise InvalidArgument(f"{self.what}: the embed task takes one input (sequence BYTES, or token ids "
                                  f"INT64 [-1] with tokenizer: none); config lists {[s.name for s in config.inputs]}")
        spec = config.inputs[0]
        if self.tokenizer is None and spec.datatype not in ("INT64", "INT32"):
            raise InvalidArgument(f"{self.what}: with tokenizer: none, input '{spec.name}' holds token ids "
                                  f"(INT64 or INT32, shape [-1], ragged), not {spec.datatype}")
        if self.tokenizer is not None and spec.datatype != "BYTES":
            raise InvalidArgument(f"{self.what}: input '{spec.name}' is tokenized on the server, so it is BYTES, "
                                  f"not {spec.datatype} (or set transformers.tokenizer: none)")
        for out in config.outputs:
            if out.name not in KNOWN_OUTPUTS:
                raise InvalidArgument(f"{self.what}: output '{out.name}' is not one the embed task makes; "
                                      f"known: {', '.join(KNOWN_OUTPUTS)}")
            if out.name != "length" and out.shape[-1:] != [self.hidden]:
                raise InvalidArgument(f"{self.what}: output '{out.name}' is declared {out.shape}; the model's "
                                      f"hidden size is {self.hidden} (shape [{self.hidden}] pooled, [-1, "
                                      f"{self.hidden}] per token)")
        if config.output("hidden_states") is not None and config.transformers.hidden_states_layer is None:
            raise InvalidArgument(f"{self.what}: output 'hidden_states' needs transformers.hidden_states_layer")
        layers = getattr(self.model.config, "num_hidden_layers", None)
        for name, layer in (("layer", config.transformers.layer),
                            ("hidden_states_layer", config.transformers.hidden_states_layer)):
            if layer is not None and layers is not None and not -(layers + 1) <= layer <= layers:
                raise InvalidArgument(f"{self.what}: transformers.{name} {layer}: the model has hidden states "
                                      f"0 (embeddings) to {layers}")

    def fingerprint(self) -> str:
        return self._fingerprint

    def warmup(self) -> None:
        if self.tokenizer is not None:
            self.predict({self.context.config.inputs[0].name: np.array([b"MKTAYIAKQR"], dtype=object)})

    # --- predict ------------------------------------------------------------------------
    def predict(
        self, inputs: dict[str, np.ndarray], outputs: frozenset[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        if parameters and "trust_remote_code" in parameters:
            raise InvalidArgument("request parameter 'trust_remote_code' is refused: only the operator's model "
                                  "config (transformers.trust_remote_code) can allow a checkpoint's code")
        spec = self.context.config.inputs[0]
        rows, kept = self._token_rows(inputs[spec.name], spec.name)
        wanted = [o.name for o in self.context.config.outputs if outputs is None or o.name in outputs]
        result = self._allocate(wanted, len(rows), max((len(k) for k in kept), default=0))
        lengths = np.array([len(ids) for ids in rows], dtype=np.int64)
        for group in plan_groups(lengths, self.token_budget, self.bucket):
            self._run_group([rows[i] for i in group], [kept[i] for i in group], group, result)
        if "length" in result:
            result["length"][:] = [len(k) for k in kept]
        return result

    def _token_rows(self, column: np.ndarray, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each row's token ids (special tokens included, after the over-length policy) and the
        positions of its real tokens: those the tokenizer did not add (<cls>, <eos>, [SEP]...)."""
        if self.tokenizer is None:
            ids = np.asarray(column).reshape(len(column), -1).astype(np.int64)
            rows = [row[: int(np.flatnonzero(row != self.pad_id)[-1]) + 1] if (row != self.pad_id).any() else row[:0]
                    for row in ids]
            for index, tokens in enumerate(rows):
                if len(tokens) > self.max_length:
                    self._over(name, index, len(tokens))
                    rows[index] = tokens[: self.max_length]
            kept = [np.flatnonzero(~np.isin(tokens, self.special_ids)) for tokens in rows]
        else:
            texts = [_text(item, name, index) for index, item in enumerate(np.asarray(column, dtype=object).reshape(-1))]
            case = self.context.config.transformers.case
            if case != "keep":
                texts = [text.upper() if case == "upper" else text.lower() for text in texts]
            encoded = self.tokenizer(texts, add_special_tokens=True, return_special_tokens_mask=True)
            rows = [np.asarray(ids, dtype=np.int64) for ids in encoded["input_ids"]]
            masks = [np.asarray(mask, dtype=bool) for mask in encoded["special_tokens_mask"]]
            for index, tokens in enumerate(rows):
                if len(tokens) > self.max_length:
                    self._over(name, index, len(tokens))
                    again = self.tokenizer([texts[index]], add_special_tokens=True, return_special_tokens_mask=True,
                                           truncation=True, max_length=self.max_length)
                    rows[index] = np.asarray(again["input_ids"][0], dtype=np.int64)
                    masks[index] = np.asarray(again["special_tokens_mask"][0], dtype=bool)
            kept = [np.flatnonzero(~mask) for mask in masks]
        for index, positions in enumerate(kept):
            if not positions.size:
                raise InvalidArgument(f"input '{name}': row {index} of the request has no tokens besides special ones")
        return rows, kept

    def _over(self, name: str, index: int, tokens: int) -> None:
        if self.policy == "error":
            raise InvalidArgument(f"input '{name}': row {index} of the request has {tokens} tokens, over the "
                                  f"model's max_length {self.max_length} (transformers.over_length: error)")

    def _allocate(self, wanted: list[str], rows: int, longest: int) -> dict[str, np.ndarray]:
        result: dict[str, np.ndarray] = {}
        for name in wanted:
            datatype = self.context.config.output(name).datatype
            if name == "length":
                result[name] = np.zeros(rows, dtype=np.int32)
            elif name in RAGGED:
                result[name] = np.zeros((rows, longest, self.hidden), dtype=_numpy_dtype(datatype))
            else:
                result[name] = np.zeros((rows, self.hidden), dtype=_numpy_dtype(datatype))
        return result

    def _run_group(self, rows: list[np.ndarray], kept: list[np.ndarray], index: np.ndarray,
                   result: dict[str, np.ndarray]) -> None:
        torch = self._torch
        width = -(-max(len(ids) for ids in rows) // self.bucket) * self.bucket
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        real = np.zeros((len(rows), width), dtype=np.float32)
        for row, positions in enumerate(kept):
            real[row, positions] = 1
        with torch.inference_mode():
            batch = torch.from_numpy(ids).to(self.device)
            attention = torch.from_numpy(mask).to(self.device)
            need_states = self.layer != -1 or "hidden_states" in result
            out = self.model(input_ids=batch, attention_mask=attention, output_hidden_states=need_states)
            hidden = out.hidden_states[self.layer] if self.layer != -1 else out.last_hidden_state
            hidden = hidden.float()
            if "mean" in result:
                weights = torch.from_numpy(real).to(self.device)
                result["mean"][index] = _host(pool_mean(hidden, weights), result["mean"].dtype)
            if "cls" in result:
                result["cls"][index] = _host(hidden[:, 0], result["cls"].dtype)
            if "last" in result:
                last = torch.from_numpy(mask.sum(axis=1) - 1).to(self.device)
                result["last"][index] = _host(hidden[torch.arange(len(rows), device=self.device), last],
                                              result["last"].dtype)
            for name, states in (("per_token", hidden), ("hidden_states", None)):
                if name not in result:
                    continue
                if states is None:
                    states = out.hidden_states[self.states_layer].float()
                host = _host(states, result[name].dtype)
                for row, positions in enumerate(kept):
                    result[name][index[row], : len(positions)] = host[row, positions]

    def unload(self) -> None:
        self.model = None
        if getattr(self, "device", None) is not None and self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    def device_memory(self) -> tuple[int, int]:
        if self.model is None or self.device.type != "cuda":
            return 0, 0
        free, total = self._torch.cuda.mem_get_info(self.device)
        return total - free, total


def pool_mean(hidden: Any, weights: Any) -> Any:
    """Average of `hidden` [rows, T, H] over the tokens whose weight [rows, T] is 1."""
    return (hidden * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True)


def plan_groups(lengths: np.ndarray, budget: int, bucket: int) -> list[np.ndarray]:
    """Row indices by tokenized length, grouped so rows x padded width stays within `budget`
    (0: one group). Each group keeps its rows in request order."""
    if not budget:
        return [np.arange(len(lengths))]
    order = np.argsort(lengths, kind="stable")
    groups: list[np.ndarray] = []
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order):
            width = -(-int(lengths[order[stop]]) // bucket) * bucket
            if (stop + 1 - start) * width > budget:
                break
            stop += 1
        groups.append(np.sort(order[start:stop]))
        start = stop
    return groups


def resolve_tokenizer(model_dir: Any, settings: Any) -> Any:
    from ..repository.transformers_settings import TransformersSettings
    from .hf_checkpoint import resolve_checkpoint as resolve

    other = TransformersSettings(path=settings.tokenizer, trust_remote_code=False)
    return resolve(model_dir, other, "transformers.tokenizer")


def _text(item: object, name: str, index: int) -> str:
    if isinstance(item, (bytes, bytearray, memoryview, np.bytes_)):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidArgument(f"input '{name}': row {index} is not UTF-8 text ({error})") from None
    if isinstance(item, str):
        return item
    raise InvalidArgument(f"input '{name}': row {index} is {type(item).__name__}, expected text")


def _numpy_dtype(datatype: str) -> Any:
    return {"FP16": np.float16, "FP64": np.float64}.get(datatype, np.float32)


def _host(tensor: Any, dtype: Any) -> np.ndarray:
    return tensor.detach().to("cpu").numpy().astype(dtype, copy=False)


def _hidden_size(model_config: Any) -> int:
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(model_config, name, None)
        if isinstance(value, int):
            return value
    raise InvalidArgument(f"cannot tell the hidden size of a {type(model_config).__name__} (no hidden_size / d_model)")
