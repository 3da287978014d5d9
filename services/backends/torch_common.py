"""What the TorchScript and torch.export backends share: device placement, precision, I/O mapping.

On a CUDA device the inputs are written once into pinned (page-locked) host buffers and copied
to the device without blocking; the outputs are narrowed to their declared datatype on the
device and copied back into pinned buffers, and the host waits once, for the last copy. CUDA
events around the copies and the program give each predict's h2d / compute / d2h device times
(`last_stages`, shown in ModelStatistics' stage_stats).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorfleet.core.errors import InternalError
from tensorfleet.core.sparse import as_csr

from .base import Backend

_PRECISION_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


class TorchProgramBackend(Backend):
    """Runs a torch program whose positional inputs follow the config's input order."""

    program: Any = None
    _stages: dict[str, int] = {}  # replaced (never mutated) by each predict

    def _torch(self) -> Any:
        import torch

        return torch

    @property
    def device(self) -> Any:
        return self._torch().device(self.context.device)

    def _compute_dtype(self) -> Any:
        name = _PRECISION_DTYPES.get(self.context.precision)
        return getattr(self._torch(), name) if name else None

    def _to_device(self, array: np.ndarray) -> Any:
        torch = self._torch()
        if self.device.type == "cuda":
            # one copy, straight into page-locked memory (the request's bytes may be read-only);
            # torch's host allocator keeps the buffer until the copy that reads it is done
            staged = torch.from_numpy(np.empty((0,), array.dtype))
            pinned = torch.empty(array.shape, dtype=staged.dtype, pin_memory=True)
            pinned.numpy()[...] = array
            tensor = pinned.to(self.device, non_blocking=True)
        else:
            if not array.flags.writeable:  # zero-copy views of request bytes are read-only
                array = array.copy()
            tensor = torch.from_numpy(array)
        dtype = self._compute_dtype()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor

    def _argument(self, spec: Any, value: Any) -> Any:
        """One input as the program takes it: a dense tensor, or for a `sparse: csr` input a
        torch.sparse_csr_tensor (row offsets, column indices, values; each copied like a dense one)."""
        if not spec.sparse:
            return self._to_device(value)
        matrix = as_csr(value)
        return self._torch().sparse_csr_tensor(
            self._to_device(np.asarray(matrix.indptr, dtype=np.int64)),
            self._to_device(np.asarray(matrix.indices, dtype=np.int64)),
            self._to_device(np.asarray(matrix.data)),
            size=matrix.shape,
        )

    def predict(
        self, inputs: dict[str, np.ndarray], outputs: frozenset[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        torch = self._torch()
        clock = StageClock(torch, self.device)
        args = [self._argument(spec, inputs[spec.name]) for spec in self.context.config.inputs]
        clock.mark("h2d")
        return self._run(args, clock, outputs)

    def _run(self, args: list[Any], clock: StageClock, outputs: frozenset[str] | None) -> dict[str, np.ndarray]:
        torch = self._torch()
        with torch.inference_mode():
            result = self.program(*args)
        clock.mark("compute")
        host = self._outputs(result, outputs)
        clock.mark("d2h")
        self._stages = clock.stages()  # on CUDA: waits for the last copy back
        return {name: _as_numpy(tensor, self.context.config.output(name).datatype) for name, tensor in host.items()}

    # --- copying the next batch while this one computes (CUDA only) ---------------------
    def can_stage(self) -> bool:
        return self.device.type == "cuda"

    def stage(self, inputs: dict[str, np.ndarray]) -> _Staged:
        """The inputs copied on a side stream (the batcher's feeder thread): the copy engine
        moves the next batch while the compute stream runs the current one."""
        torch = self._torch()
        with torch.cuda.device(self.device):
            if getattr(self, "_copy_stream", None) is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            start, done = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            with torch.cuda.stream(self._copy_stream):
                start.record()
                args = [self._argument(spec, inputs[spec.name]) for spec in self.context.config.inputs]
                done.record()
        return _Staged(args, start, done)

    def predict_staged(self, staged: _Staged, outputs: frozenset[str] | None = None) -> dict[str, np.ndarray]:
        torch = self._torch()
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(staged.done)
        for tensor in staged.args:  # made on the copy stream: not reused until compute is done
            tensor.record_stream(compute)
        clock = StageClock(torch, self.device)
        results = self._run(staged.args, clock, outputs)
        self._stages = {"h2d": int(staged.start.elapsed_time(staged.done) * 1e6), **self._stages}
        return results

    def last_stages(self) -> dict[str, int]:
        return self._stages

    def _outputs(self, result: Any, wanted: frozenset[str] | None = None) -> dict[str, Any]:
        """The program's outputs on the host (copies queued); those no request wants stay on
        the device."""
        specs = self.context.config.outputs
        if isinstance(result, dict):
            tensors = [result[spec.name] for spec in specs]
        elif isinstance(result, (list, tuple)):
            tensors = list(result)
        else:
            tensors = [result]
        if len(tensors) != len(specs):
            raise InternalError(
                f"model '{self.context.config.name}' returned {len(tensors)} tensors, "
                f"config lists {len(specs)} outputs"
            )
        return {
            spec.name: self._to_host(tensor, spec.datatype)
            for spec, tensor in zip(specs, tensors, strict=True)
            if wanted is None or spec.name in wanted
        }

    def _to_host(self, tensor: Any, datatype: str) -> Any:
        """Narrow to the declared datatype on the device, then copy: an FP16 or BF16 output
        crosses to the host at half the bytes and needs no cast pass on the server's CPU.
        On CUDA the copy goes into a pinned buffer without blocking; predict waits once."""
        torch = self._torch()
        tensor = tensor.detach()
        if datatype == "FP16":
            tensor = tensor.to(torch.float16)
        elif datatype == "BF16":  # numpy has no bfloat16: the raw words, as the wire carries them
            tensor = tensor.to(torch.bfloat16).view(torch.int16)
        elif tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        if tensor.device.type != "cuda":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    def unload(self) -> None:
        self.program = None
        if self.device.type == "cuda":
            self._torch().cuda.empty_cache()

    def device_memory(self) -> tuple[int, int]:
        if self.device.type != "cuda":
            return 0, 0
        free, total = self._torch().cuda.mem_get_info(self.device)
        return total - free, total

    def _place(self, module: Any) -> Any:
        module = module.to(self.device)
        dtype = self._compute_dtype()
        if dtype is not None:
            module = module.to(dtype)
        return module


@dataclass
class _Staged:
    """One batch's inputs on the device, and the copy stream's events around their copies."""

    args: list[Any]
    start: Any
    done: Any


def _as_numpy(tensor: Any, datatype: str) -> np.ndarray:
    array = tensor.numpy()
    return array.view("<u2") if datatype == "BF16" else array


class StageClock:
    """h2d / compute / d2h of one predict: CUDA events on a CUDA device (device time, read
    once the last one has completed), the host's clock elsewhere."""

    def __init__(self, torch: Any, device: Any) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list[tuple[str, Any]] = []
        self._torch = torch
        self._start = self._now()

    def _now(self) -> Any:
        if not self._cuda:
            return time.perf_counter_ns()
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, stage: str) -> None:
        self._marks.append((stage, self._now()))

    def stages(self) -> dict[str, int]:
        if self._cuda and self._marks:
            self._marks[-1][1].synchronize()
        result: dict[str, int] = {}
        before = self._start
        for stage, point in self._marks:
            result[stage] = int(before.elapsed_time(point) * 1e6) if self._cuda else point - before
            before = point
        return result
